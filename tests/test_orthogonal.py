"""``step_length="muon"``: Muon's orthogonalised, RMS-matched step along FNGD's momentum direction.

The reference is torch's own ``torch.optim.Muon`` (momentum 0, no Nesterov, no weight decay, so a parameter moves
by exactly ``lr·0.2·sqrt(max(A, B))·NS(its gradient)``) fed with the block ``[m_W | m_b]`` of FNGD's direction
(``opt.direction(p)``) under heavy-ball momentum computed by hand.
"""

import pytest
import torch
from torch import nn

from fngd_hf import FNGD, FNGDTrainingArguments
from fngd_hf.orthogonal import orthogonalized_block, unit_layer_directions
from tiny_models import make_mlp, mlp_batch

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9+")]

LR, MOMENTUM = 3e-2, 0.9


def _layers(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def _torch_muon_step(block: torch.Tensor) -> torch.Tensor:
    """How far torch.optim.Muon at lr 1 moves a parameter whose gradient is ``block``."""
    param = torch.zeros_like(block, requires_grad=True)
    muon = torch.optim.Muon([param], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0,
                            adjust_lr_fn="match_rms_adamw")
    param.grad = block.clone()
    muon.step()
    return -param.detach()


@pytest.mark.parametrize("trust_ratio", [None, "auto"], ids=["whole", "batch_scaled"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "unit"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("share", [False, True], ids=["ngd", "fngd_shared"])
def test_step_is_torch_muon_on_the_momentum_of_fngd_direction(share, nesterov, normalize, trust_ratio):
    model = make_mlp(dtype=torch.float64)
    opt = FNGD(model, lr=LR, momentum=MOMENTUM, step_length="muon", share_coefficients=share,
               steps_per_epoch=2 if share else None, nesterov=nesterov, normalize_directions=normalize,
               trust_ratio=trust_ratio)
    layers = _layers(model)
    momenta = [None] * len(layers)
    for seed in range(5):  # steps 3-5 reuse the first epoch's coefficients when sharing
        x, y = mlp_batch(seed, dtype=torch.float64)
        nn.functional.cross_entropy(model(x), y).backward()
        # "auto": the square-root scaling rule below 64 samples a step (the default); None: Muon's whole step
        rate = LR * (min(1.0, (len(x) / 64) ** 0.5) if trust_ratio == "auto" else 1.0)
        expected = []
        for i, layer in enumerate(layers):
            direction = [opt.direction(p).clone() for p in layer.parameters()]
            if normalize:  # unit Frobenius norm of the layer's [d_W | d_b] block, before momentum
                block_norm = torch.cat([d.flatten() for d in direction]).norm()
                direction = [d / block_norm for d in direction]
            momenta[i] = direction if momenta[i] is None else [MOMENTUM * m + d for m, d in zip(momenta[i], direction)]
            # Nesterov (torch.optim.SGD's form): the step follows d + momentum·buffer, the buffer itself unchanged
            m_weight, m_bias = [d + MOMENTUM * m for d, m in zip(direction, momenta[i])] if nesterov else momenta[i]
            move = _torch_muon_step(torch.cat([m_weight, m_bias[:, None]], dim=1))
            expected.append([layer.weight.detach() - rate * move[:, :-1], layer.bias.detach() - rate * move[:, -1]])
        opt.step()
        opt.zero_grad()
        for layer, (weight, bias) in zip(layers, expected):
            torch.testing.assert_close(layer.weight.detach(), weight, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(layer.bias.detach(), bias, rtol=1e-12, atol=1e-12)
    assert opt.diagnostics()["fngd/fresh_fraction"] == (2 / 5 if share else 1.0)


def test_update_has_equal_singular_values_where_the_direction_is_low_rank():
    """The point of the variant: a rank-2 direction becomes a step whose non-zero singular values are about
    equal (Newton-Schulz's ~[0.7, 1.2] band), RMS-matched to AdamW: 0.2·sqrt(max(A, B))·‖NS‖."""
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(32, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 16, generator=g, dtype=torch.float64)
    low_rank[:, 0] *= 100.0  # one column dominates: a spread-out spectrum
    weight, bias = orthogonalized_block(low_rank[:, :-1], low_rank[:, -1], transposed=False)
    update = torch.cat([weight, bias[:, None]], dim=1)
    singular = torch.linalg.svdvals(update) / (0.2 * 32**0.5)
    assert singular[:2].min() > 0.6 and singular[:2].max() < 1.3
    assert singular[2:].max() < 0.05  # outside its own singular vectors: bf16 rounding only (NS runs in bf16)
    assert torch.linalg.svdvals(low_rank)[0] / torch.linalg.svdvals(low_rank)[1] > 10  # the input was not flat


def test_conv1d_layout_is_the_transpose_of_linear():
    """A transformers Conv1D stores its weight (in, out): the same block, transposed back."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(12, 7, generator=g)
    bias = torch.randn(12, generator=g)
    linear_w, linear_b = orthogonalized_block(weight, bias, transposed=False)
    conv_w, conv_b = orthogonalized_block(weight.T.contiguous(), bias, transposed=True)
    torch.testing.assert_close(conv_w, linear_w.T)
    torch.testing.assert_close(conv_b, linear_b)
    assert conv_w.shape == (7, 12) and conv_b.shape == (12,)


def test_trust_ratio_with_muon_step_is_refused_and_the_argument_validated(tmp_path):
    with pytest.raises(ValueError, match="trust_ratio.*step_length='muon'"):
        FNGD(make_mlp(), step_length="muon", trust_ratio=0.5)
    assert FNGD(make_mlp(), step_length="muon").param_groups[0]["trust_ratio"] is None
    args = FNGDTrainingArguments(output_dir=str(tmp_path), optimizer="fngd", fngd_step_length="muon", report_to=[])
    assert args.fngd_step_length == "muon"


def test_unit_directions_keep_the_momentum_from_being_held_by_one_huge_direction():
    """One direction 1e6 times the others (a shared epoch's first steps) dominates a raw momentum buffer for
    many steps; normalised, the buffer turns to the new direction as fast as Muon's momentum would."""
    owner = torch.tensor([0, 0, 1])
    huge = [torch.full((3, 2), 1e6), torch.full((3,), 1e6), torch.ones(4)]
    unit = unit_layer_directions(huge, owner, 2)
    layer0 = torch.cat([unit[0].flatten(), unit[1]]).norm()
    torch.testing.assert_close(layer0, torch.tensor(1.0))
    torch.testing.assert_close(unit[2].norm(), torch.tensor(1.0))
    assert torch.equal(unit_layer_directions([torch.zeros(2)], torch.tensor([0]), 1)[0], torch.zeros(2))  # no NaN
    # After 10 steps along a new unit direction, the normalised buffer points mostly along it; the raw does not.
    old, new = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    raw, normed = 1e6 * old, old.clone()
    for _ in range(10):
        raw, normed = MOMENTUM * raw + 30.0 * new, MOMENTUM * normed + new
    assert normed[1] > normed[0] and raw[0] > 100 * raw[1]


def test_normalize_directions_needs_muons_step(tmp_path):
    with pytest.raises(ValueError, match="normalize_directions=True needs step_length='muon'"):
        FNGD(make_mlp(), step_length="trust_region", normalize_directions=True)
    with pytest.raises(ValueError, match="normalize_directions"):
        FNGD(make_mlp(), normalize_directions="yes")
    with pytest.raises(ValueError, match="normalize_directions=True needs"):
        FNGDTrainingArguments(output_dir=str(tmp_path), fngd_step_length="trust_region",
                              fngd_normalize_directions=True, report_to=[])
    args = FNGDTrainingArguments(output_dir=str(tmp_path), fngd_normalize_directions=True, report_to=[])
    assert args.fngd_normalize_directions is True
    # The default: on with Muon's step (the default step length), off with the others, off when asked.
    assert FNGD(make_mlp()).normalize_directions is True
    assert FNGD(make_mlp(), step_length="trust_region").normalize_directions is False
    assert FNGD(make_mlp(), normalize_directions=False).normalize_directions is False
    assert FNGDTrainingArguments(output_dir=str(tmp_path), fngd_step_length="trust_region",
                                 report_to=[]).fngd_normalize_directions is None


def test_momentum_buffers_are_not_overwritten_by_the_orthogonalised_step():
    model = make_mlp(dtype=torch.float64)
    opt = FNGD(model, lr=LR, momentum=MOMENTUM, step_length="muon", share_coefficients=False)
    x, y = mlp_batch(0, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    first = [opt.direction(p).clone() for p in _layers(model)[0].parameters()]
    norm = torch.cat([d.flatten() for d in first]).norm()  # the default normalises the layer's direction first
    opt.step()
    for p, d in zip(_layers(model)[0].parameters(), first):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], d / norm, rtol=1e-6, atol=0)  # float32 norm


def test_auto_scales_the_step_of_muon_and_of_the_trust_region_not_of_grafting():
    """``trust_ratio="auto"``: the square-root rule below 64 samples for Muon's step (any damping mode) and the
    trust region (relative damping; fixed damping has none); AdamW's grafted length is left alone."""
    from fngd_hf import settings

    assert settings.auto_step_scaling("auto", "muon", "relative") and settings.auto_step_scaling("auto", "muon", "fixed")
    assert settings.auto_step_scaling("auto", "trust_region", "relative")
    assert not settings.auto_step_scaling("auto", "trust_region", "fixed")
    assert not settings.auto_step_scaling("auto", "adamw", "relative")
    assert not settings.auto_step_scaling(None, "muon", "relative") and not settings.auto_step_scaling(0.5, "trust_region", "relative")
    assert [settings.auto_trust_scale(b) for b in (16, 64, 256)] == [0.5, 1.0, 1.0]
    # Muon's step grows above 64 samples too, capped at AUTO_MUON_MAX_SCALE (2: batch 256); the trust region's does not
    assert [settings.auto_trust_scale(b, "muon") for b in (16, 64, 144, 256, 1024)] == [0.5, 1.0, 1.5, 2.0, 2.0]


@pytest.mark.parametrize("batch, scale", [(16, 0.5), (144, 1.5), (400, 2.0)])
def test_auto_moves_a_layer_by_the_batch_scale_of_muons_whole_step(batch, scale):
    """One step from the same weights: ``"auto"`` moves every FNGD layer by ``scale`` times what ``None`` (Muon's
    whole step) does, and the AdamW part (LayerNorm) by the same amount in both."""
    moves = {}
    for trust_ratio in (None, "auto"):
        model = make_mlp(dtype=torch.float64)
        before = [p.detach().clone() for p in model.parameters()]
        opt = FNGD(model, lr=LR, step_length="muon", trust_ratio=trust_ratio, share_coefficients=False)
        x, y = mlp_batch(0, batch=batch, dtype=torch.float64)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        moves[trust_ratio] = [p.detach() - b for p, b in zip(model.parameters(), before)]
    layer_params = {id(p) for layer in _layers(model) for p in layer.parameters()}
    for p, whole, scaled in zip(model.parameters(), moves[None], moves["auto"]):
        assert whole.abs().max() > 0
        torch.testing.assert_close(scaled, (scale if id(p) in layer_params else 1.0) * whole, rtol=1e-10, atol=1e-14)
