"""The golden manifest: what produced each case, and the sha256 of every file it holds.

`golden/manifest.json` = {"cases": [{"path", "provenance", "config", "seed", "shapes", "files": {name: sha256}}]}.
Verification covers the whole folder: every file under `golden/` (but the manifest itself) must be listed
by exactly one case with its sha256, and every listed file must exist unchanged. Case paths and file names
are relative paths that stay inside `golden/` (no `..`, no absolute paths, no links out). A manifest that
lists no case, or lists one twice, is a problem too.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.jsonfile import read_json
from dsv3_conformance.format.safetensors_io import SafetensorsFile

MANIFEST = "manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What a case folder holds: a whole-model case for check-golden, fp8 GEMM and accumulation data from a GPU, or
# pipeline schedules. A closed set: a misspelled kind would silently drop a case from every check.
KINDS = ("model", "fp8-gemm", "fp8-accumulation", "schedules")


class ManifestError(BadInput):
    """A manifest that cannot be read or does not describe the folder."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _relative(value: object, where: str) -> PurePosixPath:
    """A relative path that cannot leave the folder it is relative to."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: expected a relative path (a non-empty string), found {value!r:.100}")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value or value.startswith("~"):
        raise ManifestError(f"{where}: path {value!r} must stay inside the golden folder (relative, no '..')")
    return path


def load_manifest(golden_dir: Path) -> dict:
    """The manifest, with every field verification relies on checked for its type."""
    path = Path(golden_dir) / MANIFEST
    manifest = read_json(path, ManifestError, "golden manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), list):
        raise ManifestError(f"{path}: expected an object with a 'cases' list")
    for index, case in enumerate(manifest["cases"]):
        where = f"{path}: cases[{index}]"
        if not isinstance(case, dict):
            raise ManifestError(f"{where}: expected an object, found {type(case).__name__}")
        _relative(case.get("path"), f"{where}.path")
        files = case.get("files")
        if not isinstance(files, dict):
            raise ManifestError(f"{where}.files: expected an object of file name -> sha256, found {files!r:.100}")
        for name, digest in files.items():
            _relative(name, f"{where}.files")
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise ManifestError(f"{where}.files[{name!r}]: expected a sha256 (64 hex digits), found {digest!r:.80}")
        if case.get("kind", "model") not in KINDS:
            raise ManifestError(f"{where}.kind: expected one of {list(KINDS)}, found {case.get('kind')!r:.80}")
    return manifest


def _files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() or path.is_symlink())


def case_shapes(case_dir: Path) -> dict[str, list[int]]:
    """Shapes of the expected tensors of a case (every safetensors file but the weights), for the manifest."""
    shapes = {}
    for path in sorted(p for p in case_dir.glob("*.safetensors") if not p.name.startswith("model")):
        file = SafetensorsFile(path)
        shapes.update({f"{path.name}:{name}": list(info.shape) for name, info in file.tensors.items()})
    return shapes


def describe_case(golden_dir: Path, case_path: str, provenance: dict, seed: int | None, config_summary: dict,
                  kind: str = "model") -> dict:
    """A manifest entry for the case folder `case_path` (relative to `golden_dir`), hashing all its files.

    `kind`: one of KINDS.
    """
    case_dir = golden_dir / case_path
    files = {path.relative_to(case_dir).as_posix(): sha256(path) for path in _files_under(case_dir)}
    return {"path": case_path, "kind": kind, "provenance": provenance, "seed": seed, "config": config_summary,
            "shapes": case_shapes(case_dir), "files": files}


@dataclass(frozen=True)
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def verify(golden_dir: Path) -> list[Problem]:
    """Every difference between the manifest and the files on disk (ManifestError if it cannot be read)."""
    golden_dir = Path(golden_dir)
    manifest = load_manifest(golden_dir)
    root = golden_dir.resolve()
    problems: list[Problem] = []
    if not manifest["cases"]:
        problems.append(Problem(str(golden_dir / MANIFEST), "lists no case"))
    listed: dict[Path, str] = {}
    case_paths = [golden_dir / case["path"] for case in manifest["cases"]]
    problems += [Problem(str(path), "listed twice in the manifest") for path in sorted(set(case_paths))
                 if case_paths.count(path) > 1]
    for case in manifest["cases"]:
        case_dir = golden_dir / case["path"]
        for name, digest in case["files"].items():
            path = case_dir / name
            if path in listed:
                problems.append(Problem(str(path), "listed twice in the manifest"))
            listed[path] = digest
    for path, digest in listed.items():
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            problems.append(Problem(str(path), "is a link or leads outside the golden folder"))
        elif not path.is_file():
            problems.append(Problem(str(path), "listed in the manifest but missing"))
        elif (found := sha256(path)) != digest:
            problems.append(Problem(str(path), f"sha256 {found[:16]}... differs from the manifest's {digest[:16]}... "
                                               "(file changed or truncated)"))
    for path in _files_under(golden_dir):
        if path.name == MANIFEST and path.parent == golden_dir:
            continue
        if path not in listed:
            problems.append(Problem(str(path), "not listed in the manifest"))
    return problems


def case_dirs(golden_dir: Path, kind: str = "model") -> list[Path]:
    """The case folders of the manifest of that kind (one of KINDS), in its order."""
    if kind not in KINDS:
        raise ValueError(f"unknown case kind {kind!r}: expected one of {KINDS}")
    return [Path(golden_dir) / case["path"] for case in load_manifest(Path(golden_dir))["cases"]
            if case.get("kind", "model") == kind]
