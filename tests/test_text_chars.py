"""The character stream (text.encoder = "minilm,chars"): the glyph text of a prompt, one token per character."""
from __future__ import annotations

import pytest
import torch

from patchflow.text import CharacterEncoder, TextEncoderError, load_text_encoder
from patchflow.text.chars import POSITION_DIM, VOCAB, glyph_text


@pytest.mark.parametrize("prompt, glyphs", [
    ("the number 42 in green on a gray background", "42"),
    ("a red 7 on the left", "7"),
    ('a sign that says "open 24h", in blue', "open 24h"),
    ("the word 'exit' and the number 9.", "exit 9"),
    ("a green circle", ""),
])
def test_glyph_text_is_the_quoted_spans_and_digit_words_in_order(prompt, glyphs):
    assert glyph_text(prompt) == glyphs


def test_42_and_24_are_the_same_characters_at_swapped_positions():
    enc = CharacterEncoder()
    a, b = enc.encode(["the number 42 in red", "the number 24 in red"]).tokens
    assert a.shape == b.shape == (2, VOCAB + POSITION_DIM)
    four, two = ord("4") - 32, ord("2") - 32
    assert a[0, four] == 1 and a[1, two] == 1 and b[0, two] == 1 and b[1, four] == 1
    assert a[:, :VOCAB].sum() == 2  # one-hots
    torch.testing.assert_close(a[:, VOCAB:], b[:, VOCAB:])  # the same positions...
    assert not torch.equal(a, b)  # ...holding other characters
    assert not torch.equal(a[0, VOCAB:], a[1, VOCAB:])  # and the positions differ from each other


def test_joined_after_minilm_sd3_style():
    joint = load_text_encoder("minilm,chars")
    alone = load_text_encoder("minilm")
    emb = joint.encode(["the number 42 in green", "a red 7", "a green circle"])
    ref = alone.encode(["the number 42 in green", "a red 7", "a green circle"])
    assert joint.dim == 384 and joint.pooled_dim == 384 and joint.name == "minilm+chars"
    lm = ref.tokens.shape[1]
    torch.testing.assert_close(emb.tokens[:, :lm], ref.tokens)  # MiniLM's block first, unchanged
    torch.testing.assert_close(emb.pooled, ref.pooled)  # the pooled vector is MiniLM's
    assert emb.mask[:, lm:].sum(1).tolist() == [2, 1, 0]  # then one token per glyph character
    assert (emb.tokens[:, lm:, VOCAB + POSITION_DIM:] == 0).all()  # zero-padded to the joint width
    assert joint.identity() != alone.identity()


def test_a_long_glyph_text_is_cut_with_a_warning_and_bad_specs_name_chars():
    enc = CharacterEncoder(max_length=4)
    with pytest.warns(UserWarning, match="cut to text.max_length = 4"):
        assert enc.encode(['"abcdefgh"']).tokens.shape[1] == 4
    with pytest.raises(TextEncoderError, match="at most 256 characters"):
        CharacterEncoder(max_length=1000)
    with pytest.raises(TextEncoderError, match='"chars"'):
        load_text_encoder("charz")


def test_an_mmdit_sees_the_order_of_a_numbers_digits():
    """Through the model's text projection, '42' and '24' condition an MMDiT differently."""
    from patchflow.models import build_model
    from patchflow.models.text_config import MMDiTConfig

    torch.manual_seed(0)
    enc = load_text_encoder("minilm,chars")
    model = build_model(MMDiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                    text_dim=enc.dim, pooled_dim=enc.pooled_dim)).eval()
    for p in model.parameters():  # adaLN-Zero starts at zero: give every weight a value
        torch.nn.init.normal_(p, std=0.2)
    a, b = (enc.encode([f"the number {n} in green"]) for n in ("42", "24"))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        out_a, out_b = (model(x, t, emb.tokens, emb.pooled, emb.mask) for emb in (a, b))
    assert (out_a - out_b).abs().max() > 1e-3
