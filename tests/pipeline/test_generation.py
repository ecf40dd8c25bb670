"""Generation: the no-repeat rule against a brute-force oracle, cached batched greedy decoding
against an uncached one-sample-at-a-time loop, EOS stopping, limits."""

import copy
import random

import pytest
import torch
from PIL import Image

from pipeline.batch import Example
from pipeline.data.packing import collate_unpacked
from pipeline.generation import banned_ngram_tokens, default_whitelist, generate
from pipeline.model import build_model
from pipeline.processing import process_image
from pipeline.prompts import encode_prompt
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


def brute_force_banned(generated, n, window, whitelist, vocab):
    """Token t is banned iff generated + [t] ends with an n-gram that already starts at some
    position in [max(0, L - window), L - n] (L = len(generated))."""
    L = len(generated)
    banned = set()
    for t in range(vocab):
        seq = list(generated) + [t]
        tail = seq[-n:]
        if n <= L and any(seq[i : i + n] == tail for i in range(max(0, L - window), L - n + 1)):
            banned.add(t)
    return banned - set(whitelist)


def test_no_repeat_rule_matches_brute_force():
    rng = random.Random(0)
    for _ in range(400):
        vocab = rng.randint(2, 5)
        n = rng.randint(1, 5)
        window = rng.randint(1, 20)
        seq = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        whitelist = {rng.randrange(vocab)} if rng.random() < 0.3 else set()
        assert banned_ngram_tokens(seq, n, window, whitelist) == brute_force_banned(
            seq, n, window, whitelist, vocab
        )


def test_no_repeat_rule_hand_cases():
    # n=3: prefix (1, 2) occurred at start 0 followed by 3 -> ban 3
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3, 90) == {3}
    # window 2 only scans starts [3, 2] -> (3, 1, 2)... no match for prefix (1, 2) at start 2? start 2 is (3,1)
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3, 2) == set()
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3, 90, whitelist={3}) == set()
    assert banned_ngram_tokens([7, 7], 3, 90) == set()  # shorter than n


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("abcdefghij .\n")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(3)
    m = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).eval()
    with torch.no_grad():  # sharpen the random logits so greedy choices are far from ties
        m.decoder.lm_head.weight.mul_(20)
    return m


def reference_generate(model, tok, views, prompt, steps, n=None, window=90, whitelist=()):
    """One sample, no cache, no padding: recompute the full forward for every new token."""
    ids = encode_prompt(tok, prompt, views)
    batch = collate_unpacked([Example(ids, [-100] * len(ids), list(views))], tok.pad_id, tok.image_id)
    with torch.no_grad():
        prompt_embeds = model.embed(batch)
    out = []
    for _ in range(steps):
        with torch.no_grad():  # generated ids are plain token embeddings (even a generated <image>)
            new = model.decoder.embed_tokens(torch.tensor([out], dtype=torch.long))
            embeds = torch.cat([prompt_embeds, new], dim=1)
            logits = model.decoder(inputs_embeds=embeds).logits[0, -1]
        if n:
            for t in banned_ngram_tokens(out, n, window, whitelist):
                logits[t] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == tok.eos_id:
            return out, True
        out.append(nxt)
    return out, False


def samples():
    img = lambda w, h, c: Image.new("RGB", (w, h), c)  # noqa: E731
    return (
        [
            [process_image(img(120, 60, (250, 0, 0)), "debug-gundam")],
            [process_image(img(50, 80, (0, 90, 0)), "debug-pad")],
            [],
        ],
        ["<image>\nFree OCR.", "<image>ab", "text only prompt"],
    )


@pytest.mark.parametrize("ngram", [None, 2])
def test_batched_cached_greedy_matches_uncached_reference(tok, model, ngram):
    images, prompts = samples()
    results = generate(
        model, tok, images, prompts, max_new_tokens=12, no_repeat_ngram_size=ngram, no_repeat_window=6
    )
    for views, prompt, result in zip(images, prompts, results):
        ref, eos = reference_generate(
            model, tok, views, prompt, 12, n=ngram, window=6, whitelist=default_whitelist(tok)
        )
        assert result.token_ids == ref and result.hit_eos == eos
        assert result.text == tok.decode(ref)
    if ngram:
        plain = generate(model, tok, images, prompts, max_new_tokens=12, no_repeat_ngram_size=None)
        assert [r.token_ids for r in plain] != [r.token_ids for r in results]  # the rule did act
        for r in results:  # no bigram repeats within the window
            ids = r.token_ids
            for L in range(2, len(ids)):
                assert ids[L] not in banned_ngram_tokens(ids[:L], 2, 6)


def test_stops_at_eos(tok, model):
    images, prompts = samples()
    free = generate(model, tok, images[:1], prompts[:1], max_new_tokens=6, no_repeat_ngram_size=None)[0]
    assert len(free.token_ids) == 6 and not free.hit_eos
    stop_tok = copy.copy(tok)
    stop_tok.eos_id = free.token_ids[3]  # make the 4th greedy token the end of sequence
    first = free.token_ids.index(stop_tok.eos_id)
    res = generate(model, stop_tok, images[:1], prompts[:1], max_new_tokens=6, no_repeat_ngram_size=None)[0]
    assert res.hit_eos and res.token_ids == free.token_ids[:first]


def test_context_limit_and_errors(tok, model):
    images, prompts = samples()
    limit = model.decoder.config.max_position_embeddings
    n_prompt = len(encode_prompt(tok, prompts[2], []))
    small = copy.deepcopy(model)
    small.decoder.config.max_position_embeddings = n_prompt + 3
    res = generate(small, tok, [[]], [prompts[2]], max_new_tokens=50, no_repeat_ngram_size=None)[0]
    assert len(res.token_ids) <= 3 and limit > n_prompt
    with pytest.raises(ValueError, match="tag"):
        generate(model, tok, [[]], ["<image> no image given"], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, tok, [[], []], ["a"], max_new_tokens=2)
