"""Properties of the Transformer: causality, padding invariance, incremental == full decoding."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model_config
from translator import native
from translator.config import ConfigError
from translator.model import ModelConfig, MultiHeadAttention, build_model
from translator.native import onednn
from translator.native.modules import FEW_QUERIES, FEW_ROWS

NORMS = [pytest.param(False, id="post-norm"), pytest.param(True, id="pre-norm")]


def model_and_batch(norm_first: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_model_config(norm_first=norm_first)
    model = build_model(cfg).eval()
    src = torch.randint(4, cfg.vocab_size, (3, 7))
    tgt = torch.randint(4, cfg.vocab_size, (3, 6))
    tgt[:, 0] = cfg.bos_id
    return model, src, tgt


@pytest.mark.parametrize("norm_first", NORMS)
def test_future_tokens_do_not_change_past_logits(norm_first):
    model, src, tgt = model_and_batch(norm_first)
    logits = model(src, tgt)  # (B, T, V)
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(4, model.cfg.vocab_size, (3, 2))
    logits2 = model(src, changed)
    torch.testing.assert_close(logits[:, :4], logits2[:, :4])
    assert not torch.allclose(logits[:, 4:], logits2[:, 4:])


@pytest.mark.parametrize("norm_first", NORMS)
def test_source_padding_does_not_change_outputs(norm_first):
    model, src, tgt = model_and_batch(norm_first)
    padded = torch.cat([src, torch.full((3, 5), model.cfg.pad_id)], dim=1)  # (B, S + 5)
    torch.testing.assert_close(model(src, tgt), model(padded, tgt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", NORMS)
def test_batched_equals_one_by_one(norm_first):
    """A short sentence padded inside a batch gives the same logits as alone."""
    model, src, tgt = model_and_batch(norm_first)
    src[1, 4:] = model.cfg.pad_id
    batched = model(src, tgt)
    alone = model(src[1:2, :4], tgt[1:2])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", NORMS)
def test_incremental_decoding_equals_full_recomputation(norm_first):
    model, src, tgt = model_and_batch(norm_first)
    with torch.no_grad():
        full = model(src, tgt)  # (B, T, V)
        memory, src_mask = model.encode(src)
        cache = model.init_cache(memory, src_mask)
        steps = [model.decode_step(tgt[:, t : t + 1], cache)[:, 0] for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_in_chunks_equals_full():
    """A forced prefix fed in one call, then single steps, matches the full pass."""
    model, src, tgt = model_and_batch(True)
    with torch.no_grad():
        full = model(src, tgt)
        memory, src_mask = model.encode(src)
        cache = model.init_cache(memory, src_mask)
        head = model.decode_step(tgt[:, :3], cache)  # (B, 3, V)
        tail = [model.decode_step(tgt[:, t : t + 1], cache)[:, 0] for t in range(3, tgt.size(1))]
    torch.testing.assert_close(torch.cat([head, torch.stack(tail, 1)], 1), full, atol=1e-5, rtol=1e-5)


def test_cache_select_reorders_rows():
    model, src, tgt = model_and_batch(False)
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        cache = model.init_cache(memory, src_mask)
        model.decode_step(tgt[:, :2], cache)
        cache.select(torch.tensor([2, 0]))
        step = model.decode_step(tgt[[2, 0], 2:3], cache)[:, 0]
        full = model(src[[2, 0]], tgt[[2, 0], :3])[:, 2]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_cache_rows_grouped_by_source_match_full_passes():
    """Beams of one source share its cross-attention keys/values; reordered and grown rows stay exact."""
    model, src, tgt = model_and_batch(True)
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        cache = model.init_cache(memory, src_mask, capacity=3)  # grows on the fourth position
        model.decode_step(tgt[:, :2], cache)
        cache.select(torch.tensor([2, 2, 0, 0]), group=2)  # two beams each for sources 2 and 0
        assert cache.layers[0].cross_k.size(0) == 2 and cache.src_mask.size(0) == 2
        second = torch.tensor([[5], [6], [7], [8]])
        model.decode_step(second, cache)
        cache.select(torch.tensor([1, 0, 2, 2]))  # swap source 2's beams, duplicate a beam of source 0
        third = torch.tensor([[9], [10], [11], [12]])
        step = model.decode_step(third, cache)[:, 0]
        history = torch.cat([tgt[[2, 2, 0, 0], :2], second[[1, 0, 2, 2]], third], dim=1)  # (4, 4)
        full = model(src[[2, 2, 0, 0]], history)[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remove", ["select", "drop"])
@pytest.mark.parametrize("norm_first", NORMS)
def test_rows_joining_a_running_cache_decode_as_if_alone(norm_first, remove):
    """Sources joining after 2 and 3 steps (one longer than the rest) start at their own position 0;
    when the earliest row leaves, the slots no one else reads go, and every row stays exact."""
    model, src, tgt = model_and_batch(norm_first)
    cfg = model.cfg
    longer = torch.randint(4, cfg.vocab_size, (1, 10))
    sources = [src[0:1], src[1:2], longer]  # row r decodes sources[r] with tgt[r]
    joins_at = [0, 2, 3]
    with torch.no_grad():
        cache = model.init_cache(*model.encode(src[0:1]), capacity=2)
        logits: list[list[torch.Tensor]] = [[], [], []]
        rows = [0]  # which sentence each cache row decodes
        for slot in range(6):
            for r in (1, 2):
                if joins_at[r] == slot:
                    cache.extend(model.init_cache(*model.encode(sources[r])))
                    rows.append(r)
            if slot == 5:  # sentence 0 is done; slots 0 and 1, before anyone else's start, go
                if remove == "select":
                    order = torch.tensor([1, 2])
                    cache.select(order)
                else:  # the last row moves into the hole
                    order = cache.drop(torch.tensor([False, True, True]))
                    assert order.tolist() == [2, 1]
                rows = [rows[i] for i in order.tolist()]
                assert cache.length == 3 and sorted(cache.start.tolist()) == [0, 1]
            step_in = torch.stack([tgt[r, slot - joins_at[r]] for r in rows])[:, None]  # (R, 1)
            out = model.decode_step(step_in, cache)[:, 0]  # (R, V)
            for row, r in enumerate(rows):
                logits[r].append(out[row])
        for r in range(3):
            T = len(logits[r])
            full = model(sources[r], tgt[r : r + 1, :T])[0]  # (T, V)
            torch.testing.assert_close(torch.stack(logits[r]), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", NORMS)
def test_a_source_joining_a_cache_of_beams_takes_a_group_of_rows_starting_at_the_next_slot(norm_first):
    """Two beams per source after two steps; a longer source joins with two rows of its own at
    position 0; reordered within their groups, every row scores as a full pass over its history."""
    model, src, tgt = model_and_batch(norm_first)
    cfg = model.cfg
    longer = torch.randint(4, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        cache = model.init_cache(*model.encode(src[:2]))
        model.decode_step(tgt[:2, :2], cache)
        cache.select(torch.tensor([0, 0, 1, 1]), group=2)  # two beams each for sources 0 and 1
        cache.extend(model.init_cache(*model.encode(longer)))
        assert cache.group == 2 and cache.start.tolist() == [0, 0, 0, 0, 2, 2]
        model.decode_step(torch.tensor([[5], [6], [7], [8], [cfg.bos_id], [cfg.bos_id]]), cache)
        cache.select(torch.tensor([1, 0, 3, 3, 5, 4]))  # swap, duplicate, swap
        last = torch.tensor([[9], [10], [11], [12], [13], [14]])
        step = model.decode_step(last, cache)[:, 0]  # (6, V)
        first, second = tgt[0, :2].tolist(), tgt[1, :2].tolist()
        histories = [first + [6], first + [5], second + [8], second + [8], [cfg.bos_id], [cfg.bos_id]]
        sources = [src[0:1]] * 2 + [src[1:2]] * 2 + [longer] * 2
        for row, (source, history) in enumerate(zip(sources, histories)):
            full = model(source, torch.tensor([history + last[row].tolist()]))[0, -1]  # (V,)
            torch.testing.assert_close(step[row], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", native.BACKENDS)
def test_a_join_keeps_reordered_beams_in_the_slot_table_and_every_row_stays_exact(backend):
    """Beams reordered after two steps are held in the slot table; a source joining then gets rows
    of its own instead of every key and value being copied into the new order."""
    model, src, tgt = model_and_batch(True)
    model = native.for_backend(model, backend)
    cfg = model.cfg
    longer = torch.randint(4, cfg.vocab_size, (1, 10))
    with torch.inference_mode():
        cache = model.init_cache(*model.encode(src[:2]))
        cache.select(torch.tensor([0, 0, 1, 1]), group=2)  # two beams each, before any step
        model.decode_step(tgt[[0, 0, 1, 1], :1], cache)
        model.decode_step(torch.tensor([[5], [6], [7], [8]]), cache)
        cache.select(torch.tensor([1, 0, 3, 3]))  # swap, duplicate
        table = cache.slot_rows.clone()  # (2, 4)
        cache.extend(model.init_cache(*model.encode(longer)))
        assert cache.slot_rows.shape == (2, 6) and torch.equal(cache.slot_rows[:, :4], table)
        last = torch.tensor([[9], [10], [11], [12], [cfg.bos_id], [cfg.bos_id]])
        step = model.decode_step(last, cache)[:, 0]  # (6, V)
        first, second = [cfg.bos_id, 6], [cfg.bos_id, 8]
        histories = [first, [cfg.bos_id, 5], second, second, [], []]
        sources = [src[0:1]] * 2 + [src[1:2]] * 2 + [longer] * 2
        for row, (source, history) in enumerate(zip(sources, histories)):
            full = model(source, torch.tensor([history + last[row].tolist()]))[0, -1]  # (V,)
            torch.testing.assert_close(step[row], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", native.BACKENDS)
def test_sources_leaving_beams_in_a_filling_order_move_only_the_last_sources_in_place(backend):
    """Beams of three sources; the first leaves and the last takes its place: the cross-attention
    keys move for that one source, in their own buffer, and every row still scores exactly."""
    model, src, tgt = model_and_batch(True)
    model = native.for_backend(model, backend)
    with torch.inference_mode():
        cache = model.init_cache(*model.encode(src))
        cache.select(torch.tensor([0, 0, 1, 1, 2, 2]), group=2)
        model.decode_step(tgt[[0, 0, 1, 1, 2, 2], :1], cache)
        before = [(lc.cross_k.data_ptr(), lc.cross_k.clone()) for lc in cache.layers]
        cache.select(torch.tensor([5, 4, 3, 3]))  # source 2 takes source 0's place
        for lc, (ptr, old) in zip(cache.layers, before):
            assert lc.cross_k.data_ptr() == ptr  # in place
            assert torch.equal(lc.cross_k, old[[2, 1]])
        last = torch.tensor([[9], [10], [11], [12]])
        step = model.decode_step(last, cache)[:, 0]  # (4, V)
        for row, s in enumerate([2, 2, 1, 1]):
            full = model(src[s : s + 1], torch.tensor([tgt[s, :1].tolist() + last[row].tolist()]))[0, -1]
            torch.testing.assert_close(step[row], full, atol=1e-5, rtol=1e-5)


def test_only_fresh_one_row_per_source_caches_join():
    model, src, tgt = model_and_batch(True)
    with torch.no_grad():
        cache = model.init_cache(*model.encode(src))
        started = model.init_cache(*model.encode(src[:1]))
        model.decode_step(tgt[:1, :1], started)
        with pytest.raises(ValueError, match="one-row-per-source"):
            cache.extend(started)


def test_cache_select_rejects_rows_that_do_not_fill_groups():
    model, src, tgt = model_and_batch(True)
    with torch.no_grad():
        cache = model.init_cache(*model.encode(src))
        model.decode_step(tgt[:, :1], cache)
        with pytest.raises(ValueError, match="groups of 2"):
            cache.select(torch.tensor([0, 0, 1]), group=2)


def test_embeddings_are_shared_by_source_target_and_output():
    model, _, _ = model_and_batch(False)
    assert model.generator.embedding.weight is model.embed.tokens.weight


BACKENDS = pytest.mark.parametrize("backend", native.BACKENDS)


@BACKENDS
@pytest.mark.parametrize("rows", [1, 2, FEW_ROWS, FEW_ROWS + 1, onednn.PACKED_ROWS + 1])
def test_generator_logits_are_the_tied_projection_for_any_number_of_rows(rows, backend):
    model = native.for_backend(model_and_batch(norm_first=True)[0], backend)
    x = torch.randn(rows, 1, model.cfg.d_model)
    expected = x @ model.embed.tokens.weight.t()  # (rows, 1, V)
    with torch.inference_mode():  # the decoding path: few rows take the transposed product
        logits = model.generator(x)
    assert logits.shape == expected.shape and logits.is_contiguous()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.generator(x), expected, atol=1e-5, rtol=1e-5)  # training path


@BACKENDS
@pytest.mark.parametrize("rows", [1, onednn.PACKED_ROWS + 1])  # (D, V) copy; packed weight where oneDNN is
def test_decoding_logits_follow_changes_to_the_weight(rows, backend):
    model = native.for_backend(model_and_batch(norm_first=True)[0], backend)
    x = torch.randn(rows, 1, model.cfg.d_model)
    with torch.inference_mode():
        before = model.generator(x)  # keeps a copy of the weight in the form it multiplies
    with torch.no_grad():
        model.embed.tokens.weight.mul_(2.0)  # as an optimizer step or a checkpoint load would
    with torch.inference_mode():
        after = model.generator(x)
    torch.testing.assert_close(after, 2.0 * before)


@pytest.mark.parametrize("queries", [1, 5, FEW_QUERIES, FEW_QUERIES + 1])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "per-query"])
def test_attention_of_few_queries_equals_torchs(queries, mask_kind):
    torch.manual_seed(queries)
    B, H, S, Dh = 3, 2, 12, 8
    attn = MultiHeadAttention(H * Dh, H, dropout=0.0).eval()
    x = torch.randn(B, queries, H * Dh)
    k, v = (torch.randn(S, B, H, Dh).permute(1, 2, 0, 3) for _ in range(2))  # (B, H, S, Dh) in the cache's layout
    mask = None
    if mask_kind == "keys":  # source padding: (B, 1, 1, S)
        mask = torch.arange(S) < torch.tensor([7, 3, 1])[:, None]
        mask = mask[:, None, None, :]
    elif mask_kind == "per-query":  # causal with rows' own starts: (B, 1, T, S)
        mask = torch.ones(B, 1, queries, S, dtype=torch.bool).tril(S - queries)
        mask[1, :, :, :2] = False
    with torch.inference_mode():  # decoding: the native kernel where it is built
        expected = attn.attend(x, k, v, mask)
        out = native.apply(attn).attend(x, k, v, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_native_attention_keeps_autograd_when_training():
    attn = native.apply(MultiHeadAttention(8, 2, dropout=0.0))
    x = torch.randn(2, 3, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(2))
    attn.attend(x, k, v, None).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, k, v))



def test_cross_attention_keys_values_are_stored_contiguous():
    # As views into the (B, S, 2D) projection, every step's attention products would copy them.
    model, src, _ = model_and_batch(norm_first=True)
    with torch.inference_mode():
        cache = model.init_cache(*model.encode(src))
    assert all(lc.cross_k.is_contiguous() and lc.cross_v.is_contiguous() for lc in cache.layers)


def test_sequence_longer_than_positions_is_a_clear_error():
    cfg = tiny_model_config(max_positions=8)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, key",
    [({"d_model": 30, "n_heads": 4}, "n_heads"), ({"d_ff": -1}, "d_ff"), ({"dropout": 1.5}, "dropout"),
     ({"vocab_size": 0}, "vocab_size")],
)
def test_impossible_model_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**overrides)
