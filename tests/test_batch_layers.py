"""batch_layers=True: the first epoch's per-layer maths deferred to the end of backward and batched
over equally shaped layers. Same numbers as the per-layer path (and the dense reference); every case
that cannot defer (torch.autograd.grad, create_graph, DDP, CW-NGD) takes the per-layer path."""

import warnings

import pytest
import torch

import reference as ref
import test_exactness as ex
from fngd_hf import CWNGD, FNGD
from fngd_hf import functional as F
from fngd_hf import batched as batched_module
from tiny_models import spy_batches


@pytest.mark.parametrize(
    "kind, mode, solve_check",
    [("mlp", "fixed", "per_layer"), ("mlp_nobias", "relative", "per_step"), ("bart", "relative", "per_step"),
     ("marian", "fixed", "per_layer"), ("t5", "relative", "per_layer")],
)
def test_batched_step_moves_by_dense_natural_gradient(kind, mode, solve_check):
    build = ex.builder(kind)
    model = build()
    reference_model = ref.clone_model(model, build)
    opt = ex.make_fngd(kind, model, mode, batch_layers=True, solve_check=solve_check)
    calls = spy_batches(opt)
    batch = ex.make_batch(kind, seed=1)
    expected = ex.dense_directions(kind, reference_model, batch, opt, mode)
    before = ex.snapshot(opt)
    ex.batch_loss(kind, model, batch).backward()
    # Every layer went through a batched call, and equally shaped layers shared one.
    assert sum(calls) == len(opt.managed_modules) and not opt._deferred
    if not ex.is_mlp(kind):
        assert len(calls) < len(opt.managed_modules)
    opt.step()
    assert opt.skipped_steps == 0
    ex.assert_moves(opt, before, expected)


def test_batched_accumulation_is_average_of_micro_batch_natural_gradients():
    kind, mode = "bart", "relative"
    build = ex.builder(kind)
    model = build()
    reference_model = ref.clone_model(model, build)
    opt = ex.make_fngd(kind, model, mode, gradient_accumulation_steps=2, batch_layers=True)
    calls = spy_batches(opt)
    halves = [ex.make_batch(kind, seed, batch=3) for seed in (3, 4)]
    per_half = [
        ex.dense_directions(kind, reference_model, half, opt, mode, multiplier=6, loss_scale=0.5) for half in halves
    ]
    expected = {name: (per_half[0][name] + per_half[1][name]) / 2 for name in per_half[0]}
    before = ex.snapshot(opt)
    for half in halves:
        (ex.batch_loss(kind, model, half) / 2).backward()
    assert sum(calls) == 2 * len(opt.managed_modules)  # the second backward added to the first's .grad
    opt.step()
    ex.assert_moves(opt, before, expected)


def run_steps(kind, batch_layers, steps=7, **options):
    """Relative damping, momentum, trust region; sharing with a 3-step epoch; two micro-batches a step;
    step 4 has a batch of another size (fresh coefficients, not banked)."""
    model = ref.tiny_seq2seq(kind, seed=0)
    kwargs = dict(lr=1e-3, damping=0.05, steps_per_epoch=3, gradient_accumulation_steps=2, stat_dtype=torch.float64,
                  step_length="trust_region")
    kwargs.update(options)
    opt = FNGD(model, batch_layers=batch_layers, **kwargs)
    calls = spy_batches(opt)
    for step in range(steps):
        for micro in range(2):
            if kwargs.get("share_by") == "sample":
                opt.set_sample_ids([10 * (step % 3) + micro * 5 + n for n in range(4 if step != 4 else 3)])
            (ref.seq2seq_loss(model, ref.seq2seq_batch(4 if step != 4 else 3, 2 * (step % 3) + micro)) / 2).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, calls


def assert_same_blocks(model, other, opt, rtol=1e-9):
    """Each managed block [W|b] and every other parameter agree (a block, not a bias alone: the key
    projections' bias gradient is exactly zero in exact arithmetic, so its float64 values are rounding)."""
    params, others = dict(model.named_parameters()), dict(other.named_parameters())
    managed = set()
    for name, module in opt.managed_modules.items():
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if module.bias is not None else [])
        managed.update(keys)
        mine = torch.cat([params[k].detach().reshape(-1) for k in keys])
        theirs = torch.cat([others[k].detach().reshape(-1) for k in keys])
        assert float((mine - theirs).norm() / theirs.norm()) < rtol, name
    for name, param in params.items():
        if name not in managed:
            torch.testing.assert_close(param, others[name], rtol=rtol, atol=1e-12, msg=name)


@pytest.mark.parametrize("share_by", ["position", "sample"])
@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_batched_training_equals_the_per_layer_path(kind, share_by):
    """Steps, coefficient bank and diagnostics agree over a first epoch, its shared reuse, an odd batch."""
    (plain, plain_opt, plain_calls), (batched, batched_opt, calls) = (
        run_steps(kind, flag, share_by=share_by) for flag in (False, True)
    )
    # Fresh: the first epoch's 3 steps of 2 micro-batches, and by position step 4's odd-sized batch (by
    # sample its samples were all seen at step 1).
    fresh_micro_batches = 3 * 2 + (2 if share_by == "position" else 0)
    assert not plain_calls and sum(calls) == fresh_micro_batches * len(batched_opt.managed_modules)
    assert_same_blocks(batched, plain, batched_opt)
    keys = ("coef_bank", "coef_trace") if share_by == "position" else ("coef_sample", "coef_sample_diag")
    for name, module in batched_opt.managed_modules.items():
        mine, theirs = batched_opt.state[module.weight], plain_opt.state[plain.get_submodule(name).weight]
        for key in keys:
            assert mine[key].dtype == torch.float32
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-30, msg=f"{name} {key}")
    mine, theirs = batched_opt.diagnostics(), plain_opt.diagnostics()
    assert mine["fngd/fresh_fraction"] == theirs["fngd/fresh_fraction"] < 1
    for key in ("fngd/damping", "fngd/gram_norm", "fngd/trust_clipped"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key


def test_layers_are_batched_in_chunks_under_a_memory_budget(monkeypatch):
    whole, whole_opt, whole_calls = run_steps("bart", True, steps=4)
    monkeypatch.setattr(batched_module, "_BATCHED_MAX_ELEMENTS", 1)  # room for one layer at a time
    chunked, _, calls = run_steps("bart", True, steps=4)
    assert max(whole_calls) > 1 and set(calls) == {1} and sum(calls) == sum(whole_calls)
    assert_same_blocks(chunked, whole, whole_opt, rtol=1e-12)


def test_a_backward_holding_too_much_batches_in_rounds(monkeypatch):
    whole, whole_opt, whole_calls = run_steps("bart", True, steps=4)
    # Every layer's tensors exceed the budget: each is done as soon as it is staged, in the backward.
    monkeypatch.setattr(batched_module, "_DEFERRED_MAX_BYTES", 1)
    rounds, rounds_opt, calls = run_steps("bart", True, steps=4)
    assert max(whole_calls) > 1 and set(calls) == {1} and sum(calls) == sum(whole_calls)
    assert not rounds_opt._deferred and not rounds_opt._deferred_bytes
    assert_same_blocks(rounds, whole, whole_opt, rtol=1e-12)


def test_autograd_grad_and_create_graph_take_the_per_layer_path():
    """torch.autograd.grad returns d for the weights (nothing is written to .grad), and a create_graph
    backward is not deferred; both give what the per-layer optimizer gives."""
    batch = ref.seq2seq_batch(4, 0)
    results = {}
    for flag in (False, True):
        model = ref.tiny_seq2seq("marian", seed=0)
        opt = FNGD(model, lr=1e-3, share_coefficients=False, stat_dtype=torch.float64, batch_layers=flag)
        calls = spy_batches(opt)
        weights = [m.weight for m in opt.managed_modules.values()]
        grads = torch.autograd.grad(ref.seq2seq_loss(model, batch), weights)
        assert all(w.grad is None for w in weights) and not calls and not opt._deferred
        opt.zero_grad()
        ref.seq2seq_loss(model, batch).backward(create_graph=True)
        assert not calls
        results[flag] = grads, [w.grad.detach().clone() for w in weights]
        opt.zero_grad()
    for mine, theirs in zip(results[True], results[False]):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-20)


def test_not_deferred_for_cwngd_a_forced_per_sample_gram_hooks_or_frozen_parameters():
    batch = ref.seq2seq_batch(4, 0)

    def hooked(model):
        seen = []
        model.get_submodule("model.encoder.layers.0.fc1").weight.register_hook(lambda g: seen.append(g) or g * 0.5)
        return seen

    def frozen_after_construction(model):
        model.get_submodule("model.encoder.layers.0.fc1").bias.requires_grad_(False)

    cases = [
        (lambda m: CWNGD(m, share_coefficients=False, batch_layers=True), None, False),
        (lambda m: FNGD(m, share_coefficients=False, batch_layers=True, gram_path="per_sample"), None, False),
        (lambda m: FNGD(m, share_coefficients=False, batch_layers=True), hooked, True),
        (lambda m: FNGD(m, share_coefficients=False, batch_layers=True), frozen_after_construction, True),
    ]
    for make, prepare, others_batched in cases:
        model = ref.tiny_seq2seq("bart", seed=0)
        opt = make(model)
        seen = prepare(model) if prepare else None
        calls = spy_batches(opt)
        ref.seq2seq_loss(model, batch).backward()
        assert all(m.weight.grad is not None for m in opt.managed_modules.values())
        # Only the layer with the hook or the frozen bias left the batch; the hook got a real gradient.
        assert sum(calls) == (len(opt.managed_modules) - 1 if others_batched else 0)
        if seen is not None:
            assert len(seen) == 1 and seen[0] is not None


def test_not_deferred_under_a_process_group_of_one(tmp_path):
    """A DDP model in a one-process group (torchrun --nproc_per_node=1): DDP's reducer writes .grad from
    its buckets at the end of the backward, so the layers keep the per-layer path and the gradients are
    the natural gradients of the plain run."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    batch = ref.seq2seq_batch(4, 0)
    plain = ref.tiny_seq2seq("bart", seed=0)
    plain_opt = FNGD(plain, share_coefficients=False)
    ref.seq2seq_loss(plain, batch).backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = ref.tiny_seq2seq("bart", seed=0)
        opt = FNGD(model, share_coefficients=False, batch_layers=True)
        calls = spy_batches(opt)
        wrapped = DistributedDataParallel(model)
        wrapped(**batch).loss.backward()
    finally:
        dist.destroy_process_group()
    assert not calls
    for name, module in opt.managed_modules.items():
        torch.testing.assert_close(module.weight.grad, plain_opt.managed_modules[name].weight.grad,
                                   rtol=1e-9, atol=1e-20, msg=name)


def test_without_the_private_torch_api_everything_takes_the_plain_paths(monkeypatch):
    """A torch without the engine queries keeps the per-layer path; one without functorch's C helpers
    captures through Function.apply. Same steps either way."""
    from fngd_hf import capture

    batch = ref.seq2seq_batch(4, 0)
    grads = {}
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(batched_module, "_ENGINE_QUERIES", False)
            monkeypatch.setattr(capture, "_apply_natural_gradient", None)
        model = ref.tiny_seq2seq("bart", seed=0)
        opt = FNGD(model, share_coefficients=False, batch_layers=True)
        calls = spy_batches(opt)
        ref.seq2seq_loss(model, batch).backward()
        assert bool(calls) is not plain
        grads[plain] = [m.weight.grad for m in opt.managed_modules.values()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-20)


def test_auto_batches_on_gpus_only():
    model = ref.tiny_seq2seq("bart", seed=0)
    opt = FNGD(model, share_coefficients=False)
    assert opt.batch_layers == "auto"
    calls = spy_batches(opt)
    ref.seq2seq_loss(model, ref.seq2seq_batch(4, 0)).backward()
    assert not calls  # a CPU tensor: the per-layer path (it drops padding tokens there)
    with pytest.raises(ValueError, match="batch_layers"):
        FNGD(model, batch_layers="yes")


def test_a_backward_that_raises_leaves_nothing_behind():
    """The layers staged by a backward that raised are never applied, whichever way the gradients are
    cleared after it (model.zero_grad() too), and step() or zero_grad() forgets them."""
    batch = ref.seq2seq_batch(4, 0)
    model = ref.tiny_seq2seq("bart", seed=0)
    opt = FNGD(model, lr=1e-3, share_coefficients=False, stat_dtype=torch.float64, batch_layers=True)
    clean = ref.tiny_seq2seq("bart", seed=0)
    clean_opt = FNGD(clean, lr=1e-3, share_coefficients=False, stat_dtype=torch.float64, batch_layers=True)
    ref.seq2seq_loss(clean, batch).backward()

    def failing_backward():
        embeddings = model.get_encoder().embed_tokens  # its backward is the last one
        handle = embeddings.register_forward_hook(
            lambda module, args, out: [out.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("boom")))][:0] or None)
        try:
            loss = ref.seq2seq_loss(model, batch)
        finally:
            handle.remove()
        with pytest.raises(RuntimeError, match="boom"):
            loss.backward()  # every managed layer's backward ran; the embedding's hook raised
        assert opt._deferred

    failing_backward()
    model.zero_grad()  # not the optimizer's: its staged layers stay, and must not reach the next .grad
    for layer in opt._layers:
        layer.micro_batches = 0
    ref.seq2seq_loss(model, batch).backward()
    for name, module in opt.managed_modules.items():
        torch.testing.assert_close(module.weight.grad, clean_opt.managed_modules[name].weight.grad,
                                   rtol=1e-12, atol=0.0, msg=name)
    assert len(opt._deferred) == 1  # only the failed backward's
    opt.step()
    assert not opt._deferred
    failing_backward()
    opt.zero_grad()
    assert not opt._deferred


def test_data_parallel_replicas_are_refused_with_a_clear_error():
    """nn.DataParallel (the Trainer's choice for several GPUs in one process) runs replicas of each layer
    in threads; their backward passes would share the optimizer's per-step state."""
    model = ref.tiny_seq2seq("bart", seed=0)
    FNGD(model, share_coefficients=False)
    layer = model.get_submodule("model.encoder.layers.0.fc1")
    replica = layer._replicate_for_data_parallel()  # what torch.nn.parallel.replicate makes, then fills:
    replica.weight, replica.bias = layer.weight * 1, layer.bias * 1
    with pytest.raises(RuntimeError, match="DataParallel"):
        replica(torch.randn(2, 3, layer.in_features, dtype=torch.float64))
    with torch.no_grad():  # evaluation and generation are not captured: fine
        replica(torch.randn(2, 3, layer.in_features, dtype=torch.float64))


def test_batched_non_finite_gradient_skips_the_step_and_keeps_state():
    model = ref.tiny_seq2seq("bart", seed=0)
    opt = FNGD(model, lr=1e-3, steps_per_epoch=2, batch_layers=True)
    batch = ref.seq2seq_batch(4, 0)
    ref.seq2seq_loss(model, batch).backward()
    opt.step()
    opt.zero_grad()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bank = {name: opt.state[m.weight]["coef_bank"].clone() for name, m in opt.managed_modules.items()}
    fc1 = model.get_submodule("model.encoder.layers.0.fc1")
    poison = fc1.register_forward_hook(lambda module, args, out: [out.register_hook(lambda g: g * float("nan"))][:0] or None)
    ref.seq2seq_loss(model, ref.seq2seq_batch(4, 1)).backward()
    poison.remove()
    with pytest.warns(RuntimeWarning, match="skipped step"):
        opt.step()
    assert opt.skipped_steps == 1
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    for name, m in opt.managed_modules.items():
        assert torch.equal(opt.state[m.weight]["coef_bank"], bank[name]), name
    opt.zero_grad()
    ref.seq2seq_loss(model, ref.seq2seq_batch(4, 1)).backward()  # training goes on
    opt.step()
    assert opt.skipped_steps == 1
    assert not torch.equal(fc1.weight, before["model.encoder.layers.0.fc1.weight"])


def test_batched_bf16_autocast_keeps_float32_statistics_and_gradients():
    batch = ref.seq2seq_batch(4, 0)
    grads = {}
    for flag in (False, True):
        model = ref.tiny_seq2seq("bart", seed=0).float()
        opt = FNGD(model, lr=1e-3, share_coefficients=False, batch_layers=flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ref.seq2seq_loss(model, batch)
        loss.backward()
        grads[flag] = [m.weight.grad for m in opt.managed_modules.values()]
    for a, b in zip(grads[True], grads[False]):
        assert a.dtype == torch.float32
        assert float((a - b).norm() / b.norm()) < 2e-2


def test_stacked_kept_tokens_change_no_number():
    """The batched path's padding drop keeps the tokens whose output gradient is nonzero in any layer of the
    group; the Gram matrices and natural gradients from them equal those from every token."""
    g = torch.Generator().manual_seed(3)
    layers, batch, length = 3, 5, 6
    x = torch.randn(layers, batch, length, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(layers, batch, length, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 3, 0, 5])  # sample 3 has no gradient at all
    real = torch.arange(length) < lengths[:, None]
    delta = delta * real[None, ..., None]
    delta[1, 1, 4] = 0.5  # past sample 1's end, but not zero in layer 1: kept for the whole group
    delta[0, 0, 2] = 0.0  # zero in one layer only: kept (the other layers need it)
    keep = F.stacked_kept_tokens(delta)
    expected = real.clone()
    expected[1, 4] = True
    assert torch.equal(keep, expected.view(-1))
    kept = keep.nonzero().squeeze(1)
    sample = kept // length

    def flat(tensor, index=kept):
        return tensor.flatten(1, 2).index_select(1, index)

    weights = torch.randn(layers, batch, generator=g, dtype=torch.float64)
    for bias in (True, False):
        dense = F.stacked_gram_matrices(x, delta, bias, 5.0)
        membership = F.sample_membership(sample, batch, torch.float64)
        torch.testing.assert_close(F.stacked_gram_matrices(flat(x), flat(delta), bias, 5.0, membership), dense)
        for index in range(layers):
            torch.testing.assert_close(dense[index], F.gram_matrix(x[index], delta[index], bias, 5.0, "per_sample"))
        assert torch.all(dense[:, 3] == 0) and torch.all(dense[:, :, 3] == 0)
        for transposed in (False, True):
            full = F.stacked_weighted_gradients(x, delta, weights, bias, transposed)
            mine = F.stacked_weighted_gradients(flat(x), flat(delta), weights, bias, transposed, sample)
            torch.testing.assert_close(mine[0], full[0])
            if bias:
                torch.testing.assert_close(mine[1], full[1])
    # No token left (a group whose output gradient is zero): K = 0 and d = 0, no error.
    none = kept[:0]
    gram = F.stacked_gram_matrices(flat(x, none), flat(delta, none), True, 5.0, F.sample_membership(none, batch, x.dtype))
    assert gram.shape == (layers, batch, batch) and torch.all(gram == 0)
    d_weight, d_bias = F.stacked_weighted_gradients(flat(x, none), flat(delta, none), weights, True, False, none)
    assert d_weight.shape == (layers, 3, 4) and torch.all(d_weight == 0) and torch.all(d_bias == 0)


def test_batched_path_drops_padding_tokens_and_changes_no_step():
    """Groups seeing the source keep its real tokens; groups seeing the target keep its labelled ones."""
    batch = ref.seq2seq_batch(4, 0)
    source, target = batch["input_ids"].shape[1], batch["labels"].shape[1]
    assert source != target  # so no group mixes the two
    real_source, labelled = int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum())
    assert real_source < 4 * source and labelled < 4 * target
    models = {}
    for drop in (True, False):
        model = ref.tiny_seq2seq("bart", seed=0)
        opt = FNGD(model, lr=1e-2, momentum=0.0, share_coefficients=False, batch_layers=True, stat_dtype=torch.float64,
                   drop_padding=drop)
        rows = {}
        original = opt._batched_layer_gradients

        def spy(entries, x, delta, batch_size, sample, membership, rows=rows, original=original):
            for entry in entries:
                rows[entry.layer.name] = x.shape[1] if sample is not None else x.shape[1] * x.shape[2]
            return original(entries, x, delta, batch_size, sample, membership)

        opt._batched_layer_gradients = spy
        ref.seq2seq_loss(model, batch).backward()
        opt.step()
        models[drop] = (model, opt)
        if drop:
            assert len(rows) == len(opt.managed_modules)
            for name, count in rows.items():
                sees_source = ".encoder." in name or ("encoder_attn." in name and name.endswith(("k_proj", "v_proj")))
                assert count == (real_source if sees_source else labelled), name
            assert opt.host_reads == 1  # the kept-token counts, once per backward
        else:
            assert set(rows.values()) == {4 * source, 4 * target}
            assert opt.host_reads == 0
    (dropped, opt), (kept, _) = models[True], models[False]
    assert_same_blocks(dropped, kept, opt, rtol=1e-10)


def test_batched_zero_output_gradient_gives_a_zero_update():
    model = ref.tiny_seq2seq("bart", seed=0)
    opt = FNGD(model, lr=0.1, momentum=0.0, share_coefficients=False, batch_layers=True)
    calls = spy_batches(opt)
    before = {name: m.weight.detach().clone() for name, m in opt.managed_modules.items()}
    (ref.seq2seq_loss(model, ref.seq2seq_batch(4, 0)) * 0.0).backward()
    assert sum(calls) == len(opt.managed_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.skipped_steps == 0
    for name, m in opt.managed_modules.items():
        assert torch.equal(m.weight, before[name]), name


def test_kept_token_counts_are_read_once_per_device(monkeypatch):
    """A model spread over devices: each device's counts are stacked and read on their own (a stack
    across devices would raise inside the backward). 'meta' stands in for a second device."""
    reads = []

    def fake_read(counts):  # meta tensors hold no numbers: say two tokens are kept everywhere
        reads.append({count.device.type for count in counts})
        return [2] * len(counts)

    monkeypatch.setattr(FNGD, "_host_counts", staticmethod(fake_read))

    def group(device, length):
        return [], torch.zeros(1, 2, length, 4, device=device), torch.zeros(1, 2, length, 5, device=device)

    opt = FNGD(ref.tiny_seq2seq("bart", seed=0))
    kept = opt._kept_tokens([group("cpu", 3), group("meta", 3), group("cpu", 4)])
    assert reads == [{"cpu"}, {"meta"}]  # one read per device, covering both cpu shapes
    assert opt.host_reads == 2
    assert sorted((key[1], key[2].type) for key in kept) == [(3, "cpu"), (3, "meta"), (4, "cpu")]
    assert all(index.shape == (2,) for index, _ in kept.values())


def test_launch_bound_true_takes_the_gpu_choices_on_a_cpu_with_the_same_step():
    """``launch_bound=True``: every "auto" as on a GPU (layers batched, the token Gram, checks at step());
    ``False``/``"auto"`` on a CPU: the per-layer path. The same numbers either way."""
    batch = ref.seq2seq_batch(4, 0)
    runs = {}
    for bound in (True, False):
        model = ref.tiny_seq2seq("bart", seed=0)
        opt = FNGD(model, lr=1e-2, momentum=0.0, share_coefficients=False, stat_dtype=torch.float64, launch_bound=bound)
        calls = spy_batches(opt)
        ref.seq2seq_loss(model, batch).backward()
        opt.step()
        assert (sum(calls) == len(opt.managed_modules)) if bound else calls == []
        runs[bound] = (model, opt)
    assert_same_blocks(runs[True][0], runs[False][0], runs[True][1], rtol=1e-8)
    with pytest.raises(ValueError, match="launch_bound"):
        FNGD(ref.tiny_seq2seq("bart", seed=0), launch_bound="gpu")
    with pytest.raises(ValueError, match="drop_padding"):
        FNGD(ref.tiny_seq2seq("bart", seed=0), drop_padding="auto")
