"""The bundled sample catalogue is what data/make_sample.py makes, byte for byte (same seed, same libraries)."""
from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "neardup" / "sample"
GENERATOR = REPO / "data" / "make_sample.py"


def _tree(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_make_sample_rebuilds_the_shipped_sample(tmp_path: Path) -> None:
    sys.path.insert(0, str(GENERATOR.parent))
    try:
        import make_sample
    finally:
        sys.path.remove(str(GENERATOR.parent))
    recorded = json.loads((SHIPPED / "provenance.json").read_text())
    here = make_sample.provenance(recorded["seed"])
    differ = {k: (recorded.get(k), v) for k, v in here.items() if recorded.get(k) != v}
    if differ:  # the encoders' and the font renderer's bytes change between library versions
        pytest.skip(f"the sample was made with other library versions (recorded, here): {differ}; byte "
                    f"identity is not expected; regenerate it with `python data/make_sample.py` if it must change")
    r = subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path / "sample")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    made, shipped = _tree(tmp_path / "sample"), _tree(SHIPPED)
    assert set(made) == set(shipped), set(made) ^ set(shipped)
    changed = [name for name in made if not filecmp.cmp(made[name], shipped[name], shallow=False)]
    assert not changed, f"data/make_sample.py no longer makes the shipped sample: {changed[:10]}"
    assert len([n for n in made if n.startswith("catalog/")]) == 119
