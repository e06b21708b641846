"""MaskLLM: the pattern math against hand cases, the training loop on tiny models (prior, loss,
resume, gradient checkpointing) and mask transfer."""
import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import TEXT, cli_process, tiny_model
from sparsellm.cli import cli
from sparsellm.errors import CompressionError
from sparsellm.compress.maskllm import (apply_masks, cosine_lr, gumbel_noise, hard_mask, hard_mask_index, linear_schedule,
                                        load_masks, mask_patterns, prior_logits, soft_mask)

P24 = mask_patterns(2, 4)


def test_patterns_by_hand():
    assert P24.tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    p48 = mask_patterns(4, 8)
    assert p48.shape == (70, 8) and (p48.sum(1) == 4).all() and len({tuple(r) for r in p48.tolist()}) == 70
    assert mask_patterns(1, 4).tolist() == [[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]]


def test_hard_mask_is_exactly_2of4():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    m = hard_mask(logits, P24)
    assert m.shape == (1000, 4) and (m.sum(1) == 2).all()
    w = torch.randn(50, 80) * m.reshape(50, 80)
    assert ((w.reshape(-1, 4) == 0).sum(1) == 2).all()
    assert torch.equal(P24[hard_mask_index(m.bool(), P24).long()], m)


def test_prior_logits_by_hand():
    keep = torch.tensor([[True, True, False, False, False, True, False, True]])  # groups 1100 and 0101
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    noise = torch.randn(6, 2, generator=gen()) * 0.01
    got = prior_logits(2, P24, 3.0, 0.01, keep, gen())
    # overlap with 1100: [2,1,1,1,1,0]; with 0101: [1,0,1,1,2,1]; bonus (overlap - 1) * 0.01 * 3
    bonus = torch.tensor([[1, 0, 0, 0, 0, -1], [0, -1, 0, 0, 1, 0]], dtype=torch.float32).t() * 0.03
    torch.testing.assert_close(got, noise + bonus)
    assert hard_mask(prior_logits(2, P24, 1e4, 0.01, keep, gen()), P24).reshape(1, 8).bool().equal(keep)
    assert torch.equal(prior_logits(2, P24, 3.0, 0.01, None, gen()), noise)


def test_soft_mask_mixes_patterns():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=gen) * 0.01
    noise = gumbel_noise(logits.shape, gen, "cpu")
    m = soft_mask(logits, P24, 4.0, 100.0, noise)
    assert m.shape == (500, 4) and ((m >= 0) & (m <= 1)).all()
    torch.testing.assert_close(m.sum(1), torch.full((500,), 2.0))  # every pattern keeps 2
    # cold and sharp without noise: the argmax pattern
    assert torch.equal(soft_mask(logits, P24, 1e-3, 1e4, torch.zeros_like(logits)).round(), hard_mask(logits, P24))
    # hand case: equal logits, no noise, tau 1: every position kept with probability 1/2
    torch.testing.assert_close(soft_mask(torch.zeros(6, 1), P24, 1.0, 1.0, torch.zeros(6, 1)), torch.full((1, 4), 0.5))


def test_schedules():
    assert linear_schedule(0, 11, 4.0, 0.05) == 4.0 and linear_schedule(10, 11, 4.0, 0.05) == pytest.approx(0.05)
    assert linear_schedule(5, 11, 100, 500) == pytest.approx(300)
    assert cosine_lr(0, 10, 1.0, 0.1) == pytest.approx(1.0) and cosine_lr(5, 10, 1.0, 0.1) == pytest.approx(0.55)


# -- the training loop on a tiny Llama --------------------------------------------------------------------

def _recipe(path, learn: dict, **top):
    data = {"seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32, "batch_size": 4},
            "stages": [{"learn": {"method": "maskllm", "batch_size": 2, "log_every": 1, **learn}}], **top}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("llama")
    tiny_model("llama", std=0.08).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _prune(*args):
    r = CliRunner().invoke(cli, ["prune", *map(str, args)])
    assert r.exit_code == 0, r.output
    return r


def test_strong_prior_and_zero_steps_is_the_prior(tmp_path, llama_dir):
    """Wanda has no weight update, so learning nothing from a very strong Wanda prior must give
    exactly Wanda 2:4's model."""
    _prune("--model", llama_dir, "--recipe", _recipe(tmp_path / "r.yaml", {"prior": "wanda", "steps": 0, "prior_strength": 1e4}),
           "-o", tmp_path / "learned")
    _prune("--model", llama_dir, "--method", "wanda", "--pattern", "2:4", "--calib", TEXT, "--nsamples", 4, "--seqlen", 32,
           "-o", tmp_path / "wanda")
    a, b = load_file(tmp_path / "learned" / "model.safetensors"), load_file(tmp_path / "wanda" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep, meta = load_masks(tmp_path / "learned" / "masks.safetensors")
    assert meta["pattern"] == "2:4" and len(keep) == 2 * 7
    for name, m in keep.items():
        assert ((~m).reshape(-1, 4).sum(1) == 2).all()
        assert torch.equal(a[f"{name}.weight"] == 0, ~m)


def test_loss_decreases_and_masks_change(tmp_path, llama_dir):
    _prune("--model", llama_dir, "--recipe", _recipe(tmp_path / "r.yaml", {"prior": "magnitude", "steps": 12, "nsamples": 2,
                                                                            "lr": 0.02, "tau": [1.0, 1.0], "kappa": [100, 100]}),
           "-o", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    hist = report["stages"][0]["details"]["history"]
    assert [h["step"] for h in hist] == list(range(1, 13))
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert last < first - 0.05, (first, last)
    assert 0 < hist[-1]["changed"] < 1
    w = load_file(tmp_path / "out" / "model.safetensors")
    for k, v in w.items():
        if k.startswith("model.layers.") and v.dim() == 2:
            assert ((v.reshape(-1, 4) == 0).sum(1) >= 2).all()
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    from sparsellm.evaluate.schema import validate

    validate(report)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "maskllm" in card and "2:4" in card


def test_gradient_checkpointing_same_result(tmp_path, llama_dir):
    outs = []
    for gc in (False, True):
        _prune("--model", llama_dir, "--recipe", _recipe(tmp_path / f"r{gc}.yaml", {"prior": "magnitude", "steps": 3, "lr": 0.02,
                                                                                      "gradient_checkpointing": gc}),
               "-o", tmp_path / f"out{gc}")
        outs.append(load_file(tmp_path / f"out{gc}" / "model.safetensors"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_resume_gives_the_uninterrupted_result(tmp_path, llama_dir):
    recipe = _recipe(tmp_path / "r.yaml", {"prior": "sparsegpt", "steps": 6, "checkpoint_every": 2, "lr": 0.02})
    _prune("--model", llama_dir, "--recipe", recipe, "-o", tmp_path / "whole")
    args = ("prune", "--model", llama_dir, "--recipe", recipe, "-o", tmp_path / "resumed", "--checkpoint-dir", tmp_path / "ck")
    killed = cli_process(*args, env={"SPARSELLM_TEST_KILL_AT": "learn:5"})
    assert killed.returncode != 0 and not (tmp_path / "resumed").exists()
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["results"]["learn0"]["step"] == 4
    r = CliRunner().invoke(cli, ["prune", *map(str, args[1:]), "--resume"])
    assert r.exit_code == 0, r.output
    for f in ("model.safetensors", "masks.safetensors"):
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "resumed" / f).read_bytes()
    rep = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert rep["stages"][0]["details"]["resumed_at_step"] == 4


def test_masks_transfer_to_a_finetune(tmp_path, llama_dir, tokenizer):
    _prune("--model", llama_dir, "--recipe", _recipe(tmp_path / "r.yaml", {"prior": "wanda", "steps": 2}), "-o", tmp_path / "out")
    tuned = tiny_model("llama", std=0.08)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    tokenizer.save_pretrained(tmp_path / "tuned")
    r = CliRunner().invoke(cli, ["apply-masks", str(tmp_path / "out" / "masks.safetensors"), "--model", str(tmp_path / "tuned"),
                                 "-o", str(tmp_path / "tuned24")])
    assert r.exit_code == 0, r.output
    src, dst = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "tuned24" / "model.safetensors")
    orig = tuned.state_dict()
    keep, _ = load_masks(tmp_path / "out" / "masks.safetensors")
    for name, m in keep.items():
        w = dst[f"{name}.weight"]
        assert torch.equal(w == 0, ~m) and torch.equal(w[m], orig[f"{name}.weight"][m])
        assert torch.equal(src[f"{name}.weight"] == 0, ~m)
    assert torch.equal(dst["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])

    other = tiny_model("llama", intermediate_size=96)
    with pytest.raises(CompressionError, match=r"^model\.layers\.0\.mlp\.down_proj: mask shape \(64, 128\) differs from "
                                               r"the weight's \(64, 96\)"):
        apply_masks(other, keep)


@pytest.mark.parametrize("learn, message", [
    ({"pattern": "3:2"}, "learn.maskllm.pattern"),
    ({"pattern": "2:4", "tau": [4.0, 0.0]}, "tau and kappa must be positive"),
    ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr"),
])
def test_bad_learn_recipes(tmp_path, llama_dir, learn, message):
    r = CliRunner().invoke(cli, ["prune", "--model", str(llama_dir), "--recipe", str(_recipe(tmp_path / "r.yaml", learn)),
                                 "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_learn_after_prune_and_bad_mask_files(tmp_path, llama_dir):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"prune": {"method": "wanda", "pattern": "2:4"}},
                                               {"learn": {"method": "maskllm"}}]}))
    r = CliRunner().invoke(cli, ["prune", "--model", str(llama_dir), "--recipe", str(path), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "dense weights" in r.output
    r = CliRunner().invoke(cli, ["prune", "--model", str(llama_dir), "--method", "maskllm", "--pattern", "1:3", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not divide" in r.output, r.output
    r = CliRunner().invoke(cli, ["apply-masks", str(llama_dir / "model.safetensors"), "--model", str(llama_dir), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not a sparsellm mask file" in r.output and not (tmp_path / "o").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_torchrun(tmp_path, llama_dir):
    """The launcher accelerate uses on several GPUs (torch.distributed.run), here with two CPU processes
    of 2 windows each: what DDP promises is the training of one process on the global batch of 4 (each
    process reads its own windows, the gradients of the logits are averaged, the Gumbel noise is the same
    in every process). So the learned masks equal those of one process with batch_size 4, and the losses
    agree to float32 rounding (the mean of two 2-window means is summed in another order)."""
    import os
    import subprocess
    import sys

    from conftest import HERE

    learn = {"prior": "wanda", "steps": 3, "lr": 0.02, "nsamples": 6}  # the same 6 training windows in both runs
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "sparsellm", "prune", "--model", str(llama_dir), "--recipe",
                           str(_recipe(tmp_path / "r2.yaml", {**learn, "batch_size": 2})), "-o", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _prune("--model", llama_dir, "--recipe", _recipe(tmp_path / "r1.yaml", {**learn, "batch_size": 4}), "-o", tmp_path / "one")
    two = json.loads((tmp_path / "two" / "report.json").read_text())["stages"][0]["details"]
    one = json.loads((tmp_path / "one" / "report.json").read_text())["stages"][0]["details"]
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["tokens"] == one["tokens"] == 384  # 3 steps x 4 windows x 32 tokens
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]] == [1, 2, 3]
    for a, b in zip(two["history"], one["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["changed"] == b["changed"]
    masks_two, _ = load_masks(tmp_path / "two" / "masks.safetensors")
    masks_one, _ = load_masks(tmp_path / "one" / "masks.safetensors")
    assert masks_two.keys() == masks_one.keys() and all(torch.equal(masks_two[k], masks_one[k]) for k in masks_one)
    w2, w1 = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(w2[k], w1[k]) for k in w1)
    assert ((w2["model.layers.0.mlp.up_proj.weight"].reshape(-1, 4) == 0).sum(1) == 2).all()


def test_bf16_weights_stay_bf16_with_fp32_logits(tmp_path, llama_dir):
    _prune("--model", llama_dir, "--dtype", "bfloat16", "--recipe", _recipe(tmp_path / "r.yaml", {"prior": "wanda", "steps": 2}),
           "-o", tmp_path / "out")
    w = load_file(tmp_path / "out" / "model.safetensors")
    lin = w["model.layers.1.self_attn.o_proj.weight"]
    assert lin.dtype == torch.bfloat16 and ((lin.reshape(-1, 4) == 0).sum(1) == 2).all()
    assert "mask_logits" not in " ".join(w)
