"""The golden manifest: what produced each case, and the sha256 of every file it holds.

`golden/manifest.json` = {"cases": [{"path", "provenance", "config", "seed", "shapes", "files": {name: sha256}}]}.
Verification fails loudly on a changed, truncated, missing or unlisted file, naming it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from conformance.format.errors import BadInput
from conformance.format.jsonfile import read_json
from conformance.format.safetensors_io import SafetensorsFile

MANIFEST = "manifest.json"


class ManifestError(BadInput):
    """A manifest that cannot be read or does not describe the folder."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(golden_dir: Path) -> dict:
    path = golden_dir / MANIFEST
    manifest = read_json(path, ManifestError, "golden manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), list):
        raise ManifestError(f"{path}: no 'cases' list")
    return manifest


def case_shapes(case_dir: Path) -> dict[str, list[int]]:
    """Shapes of the expected tensors of a case (every safetensors file but the weights), for the manifest."""
    shapes = {}
    for path in sorted(p for p in case_dir.glob("*.safetensors") if not p.name.startswith("model")):
        file = SafetensorsFile(path)
        shapes.update({f"{path.name}:{name}": list(info.shape) for name, info in file.tensors.items()})
    return shapes


def describe_case(golden_dir: Path, case_path: str, provenance: dict, seed: int | None, config_summary: dict,
                  kind: str = "model") -> dict:
    """A manifest entry for the case folder `case_path` (relative to `golden_dir`), hashing its files.

    kind "model": a whole-model case for check-golden; "fp8-gemm": fp8 component data from a GPU.
    """
    case_dir = golden_dir / case_path
    files = {path.name: sha256(path) for path in sorted(case_dir.iterdir()) if path.is_file()}
    return {"path": case_path, "kind": kind, "provenance": provenance, "seed": seed, "config": config_summary,
            "shapes": case_shapes(case_dir), "files": files}


@dataclass(frozen=True)
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def verify(golden_dir: Path) -> list[Problem]:
    """Every difference between the manifest and the files on disk."""
    golden_dir = Path(golden_dir)
    problems = []
    for case in load_manifest(golden_dir)["cases"]:
        case_dir = golden_dir / case["path"]
        listed = case["files"]
        for name, digest in listed.items():
            path = case_dir / name
            if not path.is_file():
                problems.append(Problem(str(path), "listed in the manifest but missing"))
            elif sha256(path) != digest:
                problems.append(Problem(str(path), f"sha256 {sha256(path)[:16]}... differs from the manifest's "
                                                   f"{digest[:16]}... (file changed or truncated)"))
        if case_dir.is_dir():
            problems += [Problem(str(path), "not listed in the manifest")
                         for path in sorted(case_dir.iterdir()) if path.is_file() and path.name not in listed]
    return problems


def case_dirs(golden_dir: Path, kind: str = "model") -> list[Path]:
    """The case folders of the manifest of that kind, in its order."""
    return [Path(golden_dir) / case["path"] for case in load_manifest(Path(golden_dir))["cases"]
            if case.get("kind", "model") == kind]
