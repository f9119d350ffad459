"""`hf/latest` of a run is a complete HF model folder: transformers and vLLM load it and answer greedily exactly as
the learner's final weights do.

The learner (real DeepSpeed on CPU, real Redis) trains the warmed-up toy model for a few steps, as in a `tbrm up`
run directory (`<run>/learner`, `<run>/config.toml`); `export_hf` then writes `<run>/hf/latest`. The learner's
in-memory model after its last step is the reference: transformers on the folder must give identical tensors and
identical greedy tokens, and vLLM (in a subprocess, as `tbrm eval` and the actors run it) the same greedy tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from buffer.client import ReplayTable, connect
from buffer.schema import FifoSampler, TableConfig
from deploy.run_dir import export_hf
from learner.settings import LearnerSettings
from learner.train import train

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration" / "learner"))
from learner_helpers import toy_trajectories  # noqa: E402

N_PROMPTS, MAX_NEW = 6, 40


def _trained_run(tmp_path: Path, model_dir: Path, redis_url: str) -> tuple[Path, torch.nn.Module]:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    (run / "learner").mkdir(parents=True)
    (run / "config.toml").write_text(f'[learner]\nmodel_path = "{model_dir}"\n')
    table = ReplayTable(connect(redis_url), TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    table.insert(toy_trajectories(model_dir, 12))
    settings = LearnerSettings(
        model_path=model_dir, run_dir=run / "learner", redis_url=redis_url, auth_token="t", batch_size=4,
        micro_batch_size=4, lr=1e-4, loss={"kind": "tbrm", "beta": 0.5}, sample_timeout_s=5.0, port=0,
        checkpoint_interval_steps=None, torch_threads=1, max_steps=3, push_interval_steps=2, report_to=[],
    )  # fmt: skip
    res = train(settings)
    assert res.policy_version == 3
    return run, res.model.eval()


def _prompt_ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from problems.toy import make_toy_task

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    system = json.loads((folder / "warmup.json").read_text())["system_prompt"]
    return [
        tok.apply_chat_template([{"role": "system", "content": system}, *p.messages], add_generation_prompt=True,
                                tokenize=True, return_dict=False)  # fmt: skip
        for p in make_toy_task(N_PROMPTS, seed=7)
    ]


def _greedy(model: torch.nn.Module, prompts: list[list[int]], eos: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)  # fmt: skip
            new = gen[0, len(ids):].tolist()
            out.append(new[: new.index(eos) + 1] if eos in new else new)
    return out


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    folder, prompts, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 * 2**20, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_new)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


@pytest.mark.slow
def test_hf_latest_loads_in_transformers_and_vllm_with_the_learners_outputs(tmp_path, toy_model_dir, redis_url):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    run, learner_model = _trained_run(tmp_path, toy_model_dir, redis_url)
    folder, version = export_hf(run)
    assert folder == run / "hf" / "latest" and version == 3
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors", "tbrm_export.json"} <= names, names  # fmt: skip
    assert json.loads((folder / "tbrm_export.json").read_text())["policy_version"] == 3
    GenerationConfig.from_pretrained(str(folder))  # generation config readable on its own

    # transformers: the same tensors as the learner's final weights, and a changed model (not the base)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    trained = learner_model.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, trained[k]), k
    base = load_file(str(toy_model_dir / "model.safetensors"))
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])

    prompts = _prompt_ids(folder)
    eos = hf.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    expected = _greedy(learner_model, prompts, eos)
    assert _greedy(hf, prompts, eos) == expected
    assert sum(len(x) for x in expected) > N_PROMPTS * 5  # real answers, not empty strings

    # vLLM, in its own process as the actors and `tbrm eval` run it
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(folder), json.dumps(prompts), str(MAX_NEW)], capture_output=True,
        text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert got == expected


def test_export_picks_versions_and_refuses_missing_ones(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`tbrm export RUN --version N` from the kept files (no training needed: a saved state dict is an export)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from learner.weights import hf_state_dict, weights_path

    run = tmp_path / "run"
    weights = run / "learner" / "weights"
    weights.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    for v in (4, 5):
        with torch.no_grad():
            model.model.norm.weight.fill_(float(v))
        save_file(hf_state_dict(model), str(weights_path(weights, v)), metadata={"format": "pt"})
    folder, v = export_hf(run, version=4, base_model=tiny_model_dir)
    assert folder == run / "hf" / "v00000004" and v == 4
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    assert torch.all(loaded.model.norm.weight == 4.0)
    folder, v = export_hf(run, base_model=tiny_model_dir)
    assert folder.name == "latest" and v == 5
    assert torch.all(AutoModelForCausalLM.from_pretrained(str(folder)).model.norm.weight == 5.0)
    with pytest.raises(FileNotFoundError, match=r"version 3 is not kept.*\[4, 5\]"):
        export_hf(run, version=3, base_model=tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="no exported weights"):
        export_hf(tmp_path / "empty", base_model=tiny_model_dir)
