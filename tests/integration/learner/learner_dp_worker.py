"""Run by torchrun in the data-parallel test: train, then save this rank's parameters for comparison.

    torchrun --nproc_per_node 2 learner_dp_worker.py SETTINGS_JSON OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from learner.settings import LearnerSettings
from learner.train import train
from learner.weights import hf_state_dict

if __name__ == "__main__":
    torch.set_num_threads(1)
    settings = LearnerSettings(**json.loads(Path(sys.argv[1]).read_text()))
    res = train(settings)
    rank = int(os.environ["RANK"])
    out = Path(sys.argv[2])
    save_file(hf_state_dict(res.model), str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"step": res.step, "history": res.history}))
