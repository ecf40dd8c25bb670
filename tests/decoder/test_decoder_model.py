"""DecoderModel behaviour on the debug preset: packed rows equal separate documents, KV-cache
decoding equals the full forward (also left-padded), gradient checkpointing leaves gradients
unchanged, expert statistics and the pipeline-stage pieces compose to the full forward."""

import pytest
import torch

from decoder import DecoderModel, KVCache, decoder_config, positions_from_doc_ids


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DecoderModel(decoder_config("debug")).eval()


@pytest.mark.unit
def test_packed_rows_equal_separate_documents(model):
    lengths = [[5, 9, 3], [11, 4]]  # row 1 ends with 2 padding tokens
    t = 17
    docs = [[torch.randint(0, 512, (n,)) for n in row] for row in lengths]
    ids = torch.zeros(2, t, dtype=torch.long)
    doc_ids = torch.full((2, t), -1, dtype=torch.long)
    for r, row in enumerate(docs):
        start = 0
        for d, seq in enumerate(row):
            ids[r, start : start + len(seq)] = seq
            doc_ids[r, start : start + len(seq)] = d
            start += len(seq)
    positions = positions_from_doc_ids(doc_ids)
    assert positions[0].tolist() == [*range(5), *range(9), *range(3)]
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids, position_ids=positions).logits
        derived = model(ids, doc_ids=doc_ids).logits  # positions derived from doc_ids
        torch.testing.assert_close(derived, packed)
        for r, row in enumerate(docs):
            start = 0
            for seq in row:
                alone = model(seq[None]).logits[0]
                torch.testing.assert_close(packed[r, start : start + len(seq)], alone, rtol=1e-5, atol=1e-5)
                start += len(seq)
    counts = model.expert_counts()
    k = model.config.moe.num_experts_per_tok
    assert counts.shape == (2, 8)
    # last forward was the last document alone: 4 tokens
    assert counts.sum(dim=1).tolist() == [4 * k, 4 * k]


@pytest.mark.unit
def test_packed_expert_counts_skip_padding(model):
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1]])
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 8)), doc_ids=doc_ids)
    assert model.expert_counts().sum(dim=1).tolist() == [5 * 2, 5 * 2]


@pytest.mark.unit
def test_kv_cache_decoding_equals_full_forward(model):
    ids = torch.randint(0, 512, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, batch_size=2, capacity=20)
        steps = [model(ids[:, :6], cache=cache).logits]  # prefill
        steps.append(model(ids[:, 6:9], cache=cache).logits)  # chunk with offset
        for i in range(9, 14):
            steps.append(model(ids[:, i : i + 1], cache=cache).logits)
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_left_padded_cached_generation_matches_unpadded_rows(model):
    short, long = torch.randint(0, 512, (5,)), torch.randint(0, 512, (8,))
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[0, 3:], ids[1] = short, long
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    nxt = torch.randint(0, 512, (2, 3))
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, capacity=16)
        assert cache.keys[0].dtype == model.embed_tokens.weight.dtype
        prefill = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits
        decoded = [model(nxt[:, i : i + 1], cache=cache).logits for i in range(3)]
        for r, seq in enumerate((short, long)):
            ref = model(torch.cat([seq, nxt[r]])[None]).logits[0]
            torch.testing.assert_close(prefill[r, 0], ref[len(seq) - 1], rtol=1e-5, atol=1e-5)
            for i in range(3):
                torch.testing.assert_close(decoded[i][r, 0], ref[len(seq) + i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overflow"):
        model(nxt, cache=KVCache(model.config, batch_size=2, capacity=2))


@pytest.mark.unit
def test_gradient_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    model = DecoderModel(decoder_config("debug")).train()
    ids = torch.randint(0, 512, (2, 16))
    doc_ids = torch.tensor([[0] * 10 + [1] * 6, [0] * 13 + [-1] * 3])

    def grads():
        model.zero_grad()
        out = model(ids, doc_ids=doc_ids)
        loss = out.logits.logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, plain = grads()
    model.set_gradient_checkpointing(True)
    assert all(layer.gradient_checkpointing for layer in model.layers)
    loss_ckpt, ckpt = grads()
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=lambda m, name=name: f"{name}: {m}")
    assert plain["layers.1.mlp.gate.weight"].abs().sum() > 0


@pytest.mark.unit
def test_stage_pieces_compose_to_full_forward(model):
    """What a pipeline stage does: prepare rope/attn info, run its layers, head on the last."""
    ids = torch.randint(0, 512, (2, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    with torch.no_grad():
        full = model(ids, doc_ids=doc_ids).logits
        hidden = model.embed_tokens(ids)
        rope, info = model.prepare(2, 10, hidden.device, hidden.dtype, doc_ids=doc_ids)
        for layer in model.layers:
            hidden, _ = layer(hidden, rope, info)
        torch.testing.assert_close(model.head(hidden), full)


@pytest.mark.unit
def test_inputs_embeds_and_argument_errors(model):
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.embed_tokens(ids)).logits, model(ids).logits)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="not both"):
        model(ids, doc_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="doc_ids must be"):
        model(ids, doc_ids=torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.unit
def test_dense_model_has_no_aux_and_no_counts():
    torch.manual_seed(0)
    cfg = decoder_config(
        "dense-125m", vocab_size=300, hidden_size=48, num_heads=4, intermediate_size=96, num_layers=2
    )
    model = DecoderModel(cfg).train()
    out = model(torch.randint(0, 300, (1, 5)))
    assert out.expert_counts is None
    assert out.aux_loss.item() == 0.0 and out.aux_loss.shape == ()
