"""`train.fp8`: refused by name where it cannot run, and the conversion's module selection (torchao's Float8Linear
for the blocks' seven projections, nothing else). The FP8 numerics themselves are checked on a GPU; here torchao's
CPU emulation only shows the converted model trains."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_common import tiny_shards, train_args  # noqa: E402

from spawn import REPO, child_env  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.model import FLAVORS, Transformer, init_model  # noqa: E402
from pretrain.parallel.fp8 import check_fp8, convert_to_fp8, fp8_module_names  # noqa: E402


def test_refused_with_tensor_parallelism_in_the_config():
    with pytest.raises(ConfigError, match=r"train.fp8=tensorwise needs parallel.tp=1"):
        load_config(None, ["train.fp8=tensorwise", "parallel.tp=2"])


def test_refused_on_cpu_naming_the_setting():
    with pytest.raises(ConfigError, match=r"train.fp8=rowwise needs a CUDA GPU .* this run is on cpu"):
        check_fp8("rowwise", torch.device("cpu"))
    check_fp8("none", torch.device("cpu"))  # off: nothing to check


@pytest.mark.slow
def test_a_cpu_run_with_fp8_exits_2_in_one_line(tmp_path_factory):
    data = tiny_shards(tmp_path_factory.mktemp("data"))
    args = train_args(data / "shards", tmp_path_factory.mktemp("run") / "run", "train.fp8=tensorwise",
                      "train.device=cpu")
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.fp8=tensorwise needs a CUDA GPU" in lines[0], p.stderr[-2000:]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_only_the_block_projections_are_converted(recipe):
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    args = FLAVORS["debug"].replace(vocab_size=256)  # dim 64, FFN 192: every projection divisible by 16
    model = Transformer(args)
    init_model(model, args, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = convert_to_fp8(model, recipe, emulate=True)
    expected = [f"layers.{i}.{m}" for i in range(args.n_layers)
                for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                          "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    assert names == sorted(expected)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert converted == sorted(expected)  # not the output head, not the embedding
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()  # same parameter names: checkpoints and export are unchanged
    assert all(torch.equal(after[n], before[n]) for n in before)

    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_projections_fp8_cannot_take_are_left_alone():
    args = FLAVORS["debug"].replace(vocab_size=256, ffn_hidden_dim=200)  # 200 is not a multiple of 16
    names = fp8_module_names(Transformer(args))
    assert names and not any("feed_forward" in n for n in names)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_loss_and_gradients_follow_bf16_on_cuda(recipe):
    """A 4-block model (dim 512) in bf16, with and without FP8 projections: the loss within 2%, every gradient
    pointing the same way."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    args = FLAVORS["debug"].replace(vocab_size=1024, dim=512, n_heads=8, n_kv_heads=4, ffn_hidden_dim=1536)
    tokens = torch.randint(0, 1024, (4, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for fp8 in (False, True):
        model = Transformer(args)
        init_model(model, args, seed=1)
        model = model.cuda().to(torch.bfloat16)
        if fp8:
            convert_to_fp8(model, recipe)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((float(loss), {n: p.grad.float() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert float(cos) > 0.95, f"{name}: cosine {float(cos):.3f}"
