"""Loading weights never executes code; data files cannot point outside their folder."""
import os
import pickle

import pytest

from unimm.convert.common import CheckpointMismatchError, load_torch_file


class _Payload:
    """Unpickling this calls os.system: what a malicious .pth would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pth_with_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Payload(str(marker))}}, f, protocol=2)
    # Plain pickle would run it (the control: the crafted file really is malicious) ...
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(str(control))))
    assert control.exists()
    # ... the loader refuses it with one message and nothing runs.
    with pytest.raises(CheckpointMismatchError, match="cannot be read as a weights-only PyTorch checkpoint"):
        load_torch_file(str(path), key="model")
    assert not marker.exists()
