"""bf16 mixed precision of the meta-step against float32 and float64 references."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from metanet import space as spaces
from metanet.meta import MetaNet, ModelConfig, meta_loss, precision
from metanet.kernels import relu_conv2d
from metanet.tasks import Episode
from metanet.trainer import ConfigError, TrainConfig, train, validate_config


def _episode(ways: int, size: int, b: int = 4, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat(b, 1)
    yq = torch.arange(ways).repeat_interleave(3).repeat(b, 1)
    return Episode(torch.randn(b, ways, 1, size, size, generator=g), ys, torch.randn(b, 3 * ways, 1, size, size, generator=g), yq)


def _meta_grads(model: MetaNet, ep: Episode, arithmetic: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, all meta-gradients flattened to float64); the backward outside the context."""
    with precision(arithmetic, "cpu"):
        loss, _ = meta_loss(model, ep, inner_steps=1, order="second", strategy="loop")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(g is None or g.dtype == p.dtype for g, p in zip(grads, params))  # float32 weights get float32 gradients
    return loss.detach(), torch.cat([g.double().flatten() for g in grads if g is not None])


@pytest.mark.parametrize("name", ["tiny", "conv4"])
def test_bf16_meta_gradient_is_near_the_float64_one(name: str) -> None:
    """bf16 changes the meta-gradient (autocast is really on) by a bounded amount, while the
    float32 step equals the float64 one; the tiny space runs the fused edges (relu_conv2d),
    conv4 the im2col stem and plain convolutions."""
    torch.manual_seed(0)
    kw = {"weights": "off"} if name == "tiny" else {"arch": "fixed", "weights": "off", "proto_head": False}
    model = MetaNet(spaces.load(name), 0, ModelConfig(dim=8, latent=4, inner_lr=0.1, **kw))
    ways = model.space.task.outputs
    ep = _episode(ways, model.space.task.input[-1], seed=1)
    ep64 = Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y)
    _, ref = _meta_grads(copy.deepcopy(model).double(), ep64, "fp32")
    _, g32 = _meta_grads(model, ep, "fp32")
    loss16, g16 = _meta_grads(model, ep, "bf16")
    rel = lambda g: float((g - ref).norm() / ref.norm())  # noqa: E731
    assert rel(g32) < 1e-5
    assert 1e-3 < rel(g16) < 0.3, rel(g16)
    assert torch.isfinite(loss16)


def test_bf16_context_runs_convolutions_in_bf16_and_fp32_is_untouched() -> None:
    y, w = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(5, 4, 3, 3, requires_grad=True)
    with precision("fp32", "cpu"):
        assert relu_conv2d(y, w, 1, 1).dtype == torch.float32
    with precision("bf16", "cpu"):
        out = relu_conv2d(y, w, 1, 1)
        assert out.dtype == torch.bfloat16
        assert F.conv2d(y, w).dtype == torch.bfloat16
    gy, gw = torch.autograd.grad(out.float().sum(), [y, w])  # reaches the float32 leaves as float32
    assert gy.dtype == gw.dtype == torch.float32
    ref_y, ref_w = torch.autograd.grad(F.conv2d(F.relu(y), w, padding=1).sum(), [y, w])
    torch.testing.assert_close(gw, ref_w, rtol=3e-2, atol=3e-2 * float(ref_w.abs().max()))


def test_unknown_precision_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, got 'fp16'"):
        precision("fp16", "cpu")
    with pytest.raises(ConfigError, match=r"config: precision must be one of fp32, bf16, got 'bf61' \(did you mean 'bf16'\?\)"):
        validate_config(TrainConfig(precision="bf61"))


def test_bf16_training_learns_and_records_its_precision(tmp_path) -> None:
    """Same seed, same steps: the bf16 run's losses differ from the fp32 run's (the
    arithmetic changed) but it learns as well; config.yaml says which it was."""
    base = dict(space="mlp_regression", tasks="sinusoid", steps=60, meta_batch=8, val_every=60, val_tasks=16, log_every=10, strategy="loop", seed=1)
    runs = {p: train(TrainConfig(precision=p, **base), tmp_path / p) for p in ("fp32", "bf16")}
    rows = {p: [json.loads(line) for line in (tmp_path / p / "metrics.jsonl").read_text().splitlines()] for p in runs}
    losses = {p: [r["query_loss"] for r in rows[p] if "query_loss" in r] for p in runs}
    assert losses["fp32"] != losses["bf16"]
    assert runs["bf16"]["best_val"] < 1.5 * runs["fp32"]["best_val"]
    assert sum(losses["bf16"][-2:]) < sum(losses["bf16"][:2])
    assert "precision: bf16" in (tmp_path / "bf16" / "config.yaml").read_text()


@pytest.mark.parametrize("create_graph", [False, True], ids=["first-order", "second-order"])
def test_bf16_batch_norm_backward_stays_in_bf16_and_matches_float32(create_graph: bool) -> None:
    """Under bf16 the norm's backward (ours, and the native kernel on the query side) runs in
    bf16 with no full-size float32 intermediate, and agrees with the float32 backward to
    bf16 precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from metanet.kernels import batch_norm

    g = torch.Generator().manual_seed(3)
    x32 = torch.randn(6, 8, 5, 5, generator=g)
    gy32 = torch.randn(6, 8, 5, 5, generator=g)
    x16 = x32.bfloat16().requires_grad_()
    y16 = batch_norm(x16)

    class FullSizeFloat32(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == x32.numel():
                    self.seen.append(str(func))
            return out

    with FullSizeFloat32() as mode:
        (gx16,) = torch.autograd.grad(y16, x16, gy32.bfloat16(), create_graph=create_graph)
    assert gx16.dtype == torch.bfloat16
    assert mode.seen == []
    x = x32.clone().requires_grad_()
    (gx,) = torch.autograd.grad(batch_norm(x), x, gy32)
    torch.testing.assert_close(gx16.float(), gx, rtol=5e-2, atol=5e-2 * float(gx.abs().max()))


@pytest.mark.parametrize("name", ["tiny", "conv4", "mlp_regression"])
def test_bf16_vmap_equals_bf16_loop(name: str) -> None:
    """Under autocast the vmapped network is cast to bf16 as a whole (autocast inside vmap
    is unreliable, see executor.run); it must give the loop's bf16 meta-gradient to bf16
    precision, and must not run in float32."""
    torch.manual_seed(0)
    kw = {"arch": "fixed", "proto_head": False} if name == "conv4" else {}
    model = MetaNet(spaces.load(name), 0, ModelConfig(dim=8, latent=4, inner_lr=0.1, weights="off", **kw))
    if name != "mlp_regression":
        ep = _episode(model.space.task.outputs, model.space.task.input[-1], seed=1)
    else:
        g = torch.Generator().manual_seed(1)
        ep = Episode(torch.randn(4, 5, 1, generator=g), torch.randn(4, 5, 1, generator=g), torch.randn(4, 10, 1, generator=g), torch.randn(4, 10, 1, generator=g))

    def grads(strategy: str, arithmetic: str) -> torch.Tensor:
        with precision(arithmetic, "cpu"):
            loss, _ = meta_loss(model, ep, inner_steps=1, order="second", strategy=strategy)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None])

    loop16, vmap16, loop32 = grads("loop", "bf16"), grads("vmap", "bf16"), grads("loop", "fp32")
    assert vmap16.dtype == torch.float32
    assert float((vmap16 - loop32).norm() / loop32.norm()) > 1e-4  # bf16 really ran under vmap
    assert float((vmap16 - loop16).norm() / loop16.norm()) < 0.1


def test_cli_trains_plain_maml_in_bf16_on_omniglot_files(tmp_path, capsys) -> None:
    """``--no-proto-head --precision bf16`` through the CLI: the run records both, and its
    checkpoint is a MAML model with a learned head (no prototype scale)."""
    import numpy as np

    from metanet.cli import main
    from metanet.tasks import DEFAULT_VAL_ALPHABETS
    from metanet.trainer import load_run

    root = tmp_path / "omni"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.savez(root / "images_background.npz", images=rng.random((3 + len(DEFAULT_VAL_ALPHABETS), 20, 28, 28)) > 0.3)
    spans = [{"alphabet": "Latin", "first_id": 1, "last_id": 3}] + [{"alphabet": a, "first_id": 4 + i, "last_id": 4 + i} for i, a in enumerate(DEFAULT_VAL_ALPHABETS)]
    (root / "alphabets_background.json").write_text(json.dumps({"background": spans}))
    out = tmp_path / "run"
    argv = ["train", "--tasks", "omniglot", "--data-root", str(root), "--space", "conv4", "--arch", "fixed", "--weights", "off", "--no-proto-head", "--precision", "bf16", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--steps", "3", "--val-every", "3", "--val-tasks", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 3 and result["nonfinite"] == 0
    cfg_text = (out / "config.yaml").read_text()
    assert "precision: bf16" in cfg_text and "proto_head: false" in cfg_text
    model, cfg = load_run(out)
    assert cfg.precision == "bf16" and not model.proto and model.proto_scale is None


def test_bf16_units_that_onednn_is_held_below_do_not_count() -> None:
    """``ONEDNN_MAX_CPU_ISA=AVX2`` (AVX2 kernels on an AVX-512 CPU): oneDNN then has no bf16
    kernels, bf16 runs as on a CPU without the units, and the guard says so; another
    machine's flags given as text are taken as they are."""
    from metanet import meta

    if not meta.cpu_bf16_units():
        pytest.skip("this CPU has no bf16 units for oneDNN to be held below")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "import metanet.meta as m; print(m.cpu_bf16_units(), m.cpu_bf16_units('flags : avx2 amx_bf16'), m.bf16_warning('cpu') is not None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True).stdout.split()
    assert out == ["False", "True", "True"], out


def test_bf16_on_a_cpu_without_bf16_units_warns_with_the_measured_slowdown(tmp_path, monkeypatch, caplog) -> None:
    from metanet import meta

    avx2 = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"
    amx = "processor : 0\nflags : fpu sse2 avx avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    assert meta.cpu_bf16_units(avx2) is False and meta.cpu_bf16_units(amx) is True and meta.cpu_bf16_units("") is None
    assert meta.bf16_warning("cpu", amx) is None and meta.bf16_warning("cpu", "") is None
    message = meta.bf16_warning("cpu", avx2)
    assert message.startswith("precision bf16 on a CPU without bf16 matrix units") and f"{meta.BF16_SLOWDOWN_WITHOUT_UNITS}x slower" in message
    assert meta.bf16_warning("cuda", avx2) is None
    monkeypatch.setattr(meta, "cpu_bf16_units", lambda cpuinfo=None: False)
    cfg = TrainConfig(space="mlp_regression", tasks="sinusoid", steps=1, meta_batch=2, val_tasks=2, val_every=1, eval_inner_steps=1, strategy="loop")
    with caplog.at_level("WARNING", logger="metanet.trainer"):
        train(dataclasses.replace(cfg, precision="bf16"), tmp_path / "bf16")
        assert "without bf16 matrix units" in caplog.text
        caplog.clear()
        train(cfg, tmp_path / "fp32")
        assert "bf16" not in caplog.text
