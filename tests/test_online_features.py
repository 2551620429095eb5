"""The online terms' pieces on the tiny models, in one process (the end-to-end run under Ray Train and DeepSpeed is
tests/test_train_stage.py::test_online_terms_and_galore_train_under_ray_train): identity cases are zero, the
map-keeping attention changes nothing but keeps maps, projections save and reload, GaLore's state is smaller."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.losses.features import attention_kl, feature_terms, full_vocab_kd, hidden_loss, layer_pairs
from pipeline.train.online import (MAPS_ATTENTION, Taps, build_projections, load_projections, register_maps_attention,
                                   save_projections, widths)

LOSS = {"temperature": 2.0, "divergence": "forward_kl", "divergence_kwargs": {}, "hidden_loss": "mse"}


def _batch(vocab: int = 512, b: int = 3, s: int = 9):
    ids = torch.randint(3, vocab, (b, s), generator=torch.Generator().manual_seed(0))
    attention = torch.ones(b, s, dtype=torch.long)
    attention[0, 6:] = 0  # a shorter row, right-padded as `collate` pads
    return ids, attention


def _load(path, maps: bool):
    if maps:
        register_maps_attention()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=MAPS_ATTENTION if maps else "sdpa").eval()


def test_layer_pairs_are_evenly_spaced_or_as_given():
    assert layer_pairs(1, 2) == [(0, 1)]
    assert layer_pairs(2, 2) == [(0, 0), (1, 1)]
    assert layer_pairs(4, 24) == [(0, 5), (1, 11), (2, 17), (3, 23)]
    assert layer_pairs(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]  # a student deeper than its teacher
    assert layer_pairs(24, 28)[:3] == [(0, 1), (1, 2), (2, 3)] and layer_pairs(24, 28)[-1] == (23, 27)
    assert layer_pairs(2, 4, [[0, 1], [1, 3]]) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="outside"):
        layer_pairs(1, 2, [[0, 2]])


def test_the_maps_attention_matches_sdpa_and_keeps_maps_of_the_mapped_layers_only(tiny_models):
    ids, attention = _batch()
    sdpa, maps = _load(tiny_models["teacher"], False), _load(tiny_models["teacher"], True)
    taps = Taps(maps, hidden=[0, 1], maps=[1])
    with torch.no_grad():
        want = sdpa(input_ids=ids, attention_mask=attention).logits
        got = maps(input_ids=ids, attention_mask=attention).logits
    real = attention.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)
    kept = taps.maps
    assert list(kept) == [1] and kept[1].shape == (3, 4, 9, 9)
    rows = kept[1].sum(-1)[:, :, :6]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # each query row of a real token is a distribution
    assert kept[1][0, :, :6, 6:].abs().max() < 1e-6  # nothing attends to padding
    assert kept[1][:, :, 2, 3:].abs().max() < 1e-6  # nor ahead (causal)
    assert getattr(maps.model.layers[0].self_attn, "kept_map", None) is None  # sdpa there: no map made
    assert set(taps.hidden) == {0, 1} and taps.hidden[1].shape == (3, 9, 128)


def test_every_term_is_zero_for_the_teacher_against_itself_with_identity_maps(tiny_models):
    ids, attention = _batch()
    model = _load(tiny_models["teacher"], True)
    blocks = widths(model)[0]
    pairs = layer_pairs(blocks, blocks)
    taps = Taps(model, [s for s, _ in pairs], [s for s, _ in pairs])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    mask = attention[:, 1:].float()
    features = taps.features(logits)
    projections = build_projections(pairs, 128, 128)
    assert not list(projections.parameters())  # identity: nothing to learn
    terms = feature_terms({"online_kd": 1, "hidden": 1, "attention": 1}, mask, attention, features, features, pairs,
                          projections, LOSS)
    assert set(terms) == {"online_kd", "hidden", "attention"}
    for name, value in terms.items():
        assert abs(float(value)) < 1e-6, name


def test_the_terms_are_positive_between_different_models_and_their_gradients_reach_the_student(tiny_models):
    ids, attention = _batch()
    teacher, student = _load(tiny_models["teacher"], True), _load(tiny_models["student"], True)
    (s_blocks, s_width, s_heads), (t_blocks, t_width, t_heads) = widths(student), widths(teacher)
    assert (s_width, s_heads) != (t_width, t_heads)  # the tiny pair differs in width and in heads
    pairs = layer_pairs(s_blocks, t_blocks)
    projections = build_projections(pairs, s_width, t_width)
    t_taps = Taps(teacher, [t for _, t in pairs], [t for _, t in pairs])
    s_taps = Taps(student, [s for s, _ in pairs], [s for s, _ in pairs])
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1]
    s_logits = student(input_ids=ids, attention_mask=attention).logits[:, :-1]
    terms = feature_terms({"online_kd": 1, "hidden": 1, "attention": 1}, attention[:, 1:].float(), attention,
                          s_taps.features(s_logits), t_taps.features(t_logits), pairs, projections, LOSS)
    assert all(float(v.detach()) > 0 for v in terms.values()), terms
    sum(terms.values()).backward()
    assert projections[0].weight.grad.abs().sum() > 0
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_the_tensor_terms_match_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float()
    rows = mask.bool()
    assert torch.isclose(hidden_loss(s, t, mask), (((s - t) ** 2).sum(-1) / (t ** 2).sum(-1))[rows].mean())
    assert torch.isclose(hidden_loss(s, t, mask, "cosine"),
                         (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1))[rows].mean())
    p, q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    kl = (p.exp() * (p - q)).sum(-1)[rows].mean()
    assert torch.isclose(full_vocab_kd(s, t, mask, temperature=1.0), kl, atol=1e-6)
    # a teacher with padded vocabulary rows beyond the student's: cut to the common size
    padded = torch.cat([t, torch.full((2, 5, 3), -1e4)], -1)
    assert torch.isclose(full_vocab_kd(s, padded, mask, temperature=1.0), kl, atol=1e-6)
    # attention: heads averaged when the counts differ
    maps_t = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    maps_s = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    a, b = maps_t.mean(1), maps_s.mean(1)
    want = (a * (a.log() - b.log())).sum(-1)[rows].mean()
    assert torch.isclose(attention_kl(maps_t, maps_s, mask), want, atol=1e-6)


def test_projections_save_and_reload(tmp_path):
    pairs = [(0, 1), (1, 3)]
    projections = build_projections(pairs, 64, 128)
    save_projections(projections, pairs, tmp_path)
    loaded, loaded_pairs = load_projections(tmp_path)
    assert loaded_pairs == pairs
    x = torch.randn(2, 64)
    for a, b in zip(projections, loaded):
        assert torch.equal(a(x), b(x))


def test_galore_keeps_at_least_60_percent_less_optimizer_state_on_the_linear_layers(tiny_models):
    """The same student, one step of each optimizer on the same batch; rank 8 = width/8. The whole student's figure
    is smaller, as its embedding (32,768 of ~70,000 weights here) keeps full Adam moments."""
    from pipeline.train.worker import WorkerSpec, build_optimizer, optimizer_state_bytes

    ids, attention = _batch()
    sizes = {}
    for name in ("adamw", "galore"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
        spec = WorkerSpec.__new__(WorkerSpec)
        spec.optimizer, spec.lr, spec.weight_decay = name, 1e-3, 0.0
        spec.galore = {"rank": 8, "update_proj_gap": 200, "scale": 0.25}
        optimizer = build_optimizer(model, spec)
        out = model(input_ids=ids, attention_mask=attention, labels=ids)
        out.loss.backward()
        optimizer.step()
        linear = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
        sizes[name] = (optimizer_state_bytes(optimizer), optimizer_state_bytes(optimizer, linear))
    (adam_all, adam_linear), (galore_all, galore_linear) = sizes["adamw"], sizes["galore"]
    assert galore_linear <= 0.4 * adam_linear, sizes
    assert galore_all < adam_all, sizes


def test_the_offloaded_teacher_gives_the_logits_of_the_whole_one(tiny_models):
    """`cpu_offload` keeps the weights in CPU memory and moves each module to the execution device for its pass
    (here the CPU itself: the GPU case needs a GPU); ZeRO-3's partitioned teacher runs in the end-to-end test."""
    from pipeline.train.online import load_teacher

    ids, attention = _batch()
    cpu = torch.device("cpu")
    whole, _, held = load_teacher(str(tiny_models["teacher"]), None, torch.float32, "device", "sdpa", cpu)
    offloaded, module, _ = load_teacher(str(tiny_models["teacher"]), None, torch.float32, "cpu_offload", "sdpa", cpu)
    assert held == sum(p.numel() * 4 for p in whole.parameters())
    assert not any(p.requires_grad for p in module.parameters()) and not module.training
    with torch.no_grad():
        assert torch.allclose(whole(input_ids=ids, attention_mask=attention).logits,
                              offloaded(input_ids=ids, attention_mask=attention).logits, atol=1e-6)
