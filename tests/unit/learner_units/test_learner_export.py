"""The background weight exporter: the snapshot is taken before `submit` returns (later optimizer steps do not
leak into the exported version), the file is hashed from memory, published, and the canary log-probs match a
plain forward pass."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from actor_service.schema import canary_token_ids
from buffer.schema import WeightsInfo
from learner.export import WeightExporter, canary_logprobs
from learner.model import load_causal_lm


class Expecting:
    """Records what the exporter hands to a pusher (a real object with the two methods it calls)."""

    def __init__(self) -> None:
        self.canary: dict[int, list[float]] = {}
        self.synced: list[int] = []

    def expect_canary(self, version: int, logprobs: list[float]) -> None:
        self.canary[version] = logprobs

    def sync(self, info: WeightsInfo) -> int:
        self.synced.append(info.version)
        return 0


def test_snapshot_isolated_from_later_steps_hashed_published(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny_model_dir, trainable=True)
    published: list[WeightsInfo] = []
    pusher = Expecting()
    exp = WeightExporter(model, tmp_path, keep=2, dtype=None, publish=published.append, pusher=pusher)
    try:
        before = model.model.norm.weight.detach().clone()
        exp.submit(1)
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)  # the next optimizer step, while the export runs
        assert exp.wait_idle(60)
        info = exp.latest
        assert info is not None and info.version == 1 and published == [info] and pusher.synced == [1]
        assert torch.equal(load_file(info.path)["model.norm.weight"], before)
        assert hashlib.sha256(Path(info.path).read_bytes()).hexdigest() == info.sha256
        m = exp.metrics()
        assert m["export_time_s"] > 0 and 0 < m["export_overlap"] <= 1
        assert exp.publish_now(1) is info  # already exported: not written again
        assert exp.publish_now(2).version == 2
        assert torch.equal(load_file(exp.latest.path)["model.norm.weight"], before + 1.0)
    finally:
        exp.close()


def test_canary_logprobs_are_a_forward_pass(tiny_model_dir: Path) -> None:
    model = load_causal_lm(tiny_model_dir, trainable=False)
    ids = canary_token_ids(model.get_input_embeddings().weight.shape[0])
    assert ids == canary_token_ids(model.get_input_embeddings().weight.shape[0]) and len(set(ids)) > 10
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    want = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert canary_logprobs(model) == want
