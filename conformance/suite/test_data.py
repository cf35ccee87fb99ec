"""The shipped data itself: golden files against the manifest, and the official fp8 checkpoint's blocks."""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.checkpoint import open_checkpoint
from dsv3_conformance.format.fp8 import E4M3_MAX
from dsv3_conformance.golden.manifest import verify
from dsv3_conformance.paths import GOLDEN_DIR


def test_golden_files_match_manifest():
    """sha256 of every golden file equals the manifest's: a changed or truncated file is named."""
    problems = verify(GOLDEN_DIR)
    assert not problems, "golden files differ from golden/manifest.json:\n" + "\n".join(map(str, problems))


def test_official_checkpoint_blocks_hold_448_at_their_amax():
    """scale_inv = amax/448 per 128x128 block, padding excluded: each block's largest |q| is exactly 448."""
    with open_checkpoint(GOLDEN_DIR / "official" / "v3-tiny-fp8") as checkpoint:
        names = [n for n in checkpoint.names() if n.endswith(".weight") and checkpoint.dtype(n) == "F8_E4M3"]
        assert names
        for name in names:
            q = np.asarray(checkpoint.get(name)).astype(np.float32)
            rows, cols = -(-q.shape[0] // 128), -(-q.shape[1] // 128)
            for i in range(rows):
                for j in range(cols):
                    block = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                    assert np.abs(block).max() == E4M3_MAX, f"{name} block ({i}, {j})"
