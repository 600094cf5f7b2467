"""The text decoder and decoding strategies: exact behaviour on hand-made distributions, and a learned caption."""

import math

import torch

from imagen.config import encoder_config
from imagen.models.decoder import EncoderDecoder, beam_search, filter_logits, greedy, sample

EOS = 6


def table_logits(table):
    """next_logits(ids) from a dict: prefix tuple (after BOS) -> {token: prob}; unknown prefixes emit EOS."""
    def next_logits(ids, *_):
        rows = []
        for row in ids.tolist():
            probs = table.get(tuple(row[1:]), {EOS: 1.0})
            logits = torch.full((10,), -1e9)
            for tok, p in probs.items():
                logits[tok] = math.log(p)
            rows.append(logits)
        return torch.stack(rows)
    return next_logits


# Greedy takes 7 (0.6) and then has only weak continuations; the beam finds 8 -> 9 (0.4 * 0.9 = 0.36 > 0.6 * 0.55).
TABLE = {(): {7: 0.6, 8: 0.4}, (7,): {7: 0.55, 9: 0.45}, (8,): {9: 0.9, 7: 0.1}, (7, 7): {EOS: 1.0}, (7, 9): {EOS: 1.0},
         (8, 9): {EOS: 1.0}, (8, 7): {EOS: 1.0}}


def test_greedy_follows_the_argmax_and_stops_at_eos():
    ids = greedy(table_logits(TABLE), torch.tensor([[5]]), EOS, steps=10)
    assert ids.tolist() == [[5, 7, 7, EOS]]  


def test_beam_search_finds_the_more_likely_sequence():
    context = torch.zeros(1, 1, 4)
    out = beam_search(table_logits(TABLE), context, torch.ones(1, 1, dtype=torch.bool), 5, EOS, steps=10, num_beams=2,
                      length_penalty=0.0)
    assert out == [[8, 9]]
    assert beam_search(table_logits(TABLE), context, torch.ones(1, 1, dtype=torch.bool), 5, EOS, steps=10,
                       num_beams=1, length_penalty=0.0) == [[7, 7]]  # one beam is greedy


def test_top_k_and_top_p_filtering_exact():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7, 0.8 >= 0.7
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]


def test_sampling_with_top_k_1_is_greedy_and_seeded_sampling_repeats():
    step = table_logits(TABLE)
    start = torch.tensor([[5], [5], [5]])
    assert sample(step, start, EOS, 10, top_k=1).tolist() == greedy(step, start, EOS, 10).tolist()
    a = sample(step, start, EOS, 10, generator=torch.Generator().manual_seed(3))
    b = sample(step, start, EOS, 10, generator=torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist()


def test_encoder_decoder_learns_to_caption_two_images():
    """A learned result: teacher forcing drives the loss down until greedy and beam decoding reproduce each caption."""
    torch.manual_seed(0)
    model = EncoderDecoder(encoder_config("tiny", image_size=16, vocab_size=20), decoder_layers=1, max_len=8)
    images = torch.stack([torch.full((3, 16, 16), -1.0), torch.full((3, 16, 16), 1.0)])
    targets = torch.tensor([[5, 10, 11, 12, 6, 0], [5, 13, 14, 6, 0, 0]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = model(images, targets, targets != 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05
    assert model.generate(images, decoding="greedy") == [[10, 11, 12], [13, 14]]
    assert model.generate(images, decoding="beam", num_beams=3) == [[10, 11, 12], [13, 14]]
