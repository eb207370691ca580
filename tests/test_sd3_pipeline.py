"""A whole diffusers SD3 pipeline folder (transformer, CLIP-L, CLIP-G, T5, their tokenizers, VAE, scheduler),
imported with `patchflow convert diffusers-sd3`, samples what diffusers' StableDiffusion3Pipeline samples.

Every model is tiny and random; the same prompt, negative prompt, initial noise, steps and guidance go to both.
"""
from __future__ import annotations

import pytest
import torch

from patchflow.cli import main as cli_main
from patchflow.flow.samplers import flow_timesteps
from patchflow.pipeline import Pipeline, generate, load_run_config
from tests.test_text import clip_tokenizer, t5_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["the cat and the dog", "a tiny red square on the left"]
STEPS, GUIDANCE, SEED = 6, 4.5, 3


def _randomize(model, seed: int, scale: float = 0.15):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _clip(hidden: int, projection: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    tok.model_max_length = 77
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg).eval(), tok


def _t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    tok = t5_tokenizer()
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                    num_heads=3, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return model.eval(), tok


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A StableDiffusion3Pipeline.save_pretrained folder of tiny random models; and the pipeline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_l, tok_l = _clip(16, 8, seed=1)
    clip_g, tok_g = _clip(24, 12, seed=2)
    t5, tok_t5 = _t5(48, seed=3)
    torch.manual_seed(4)
    transformer = _randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=20, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm"), seed=5)
    torch.manual_seed(6)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g,
                                    tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)
    folder = tmp_path_factory.mktemp("sd3") / "stable-diffusion-3-tiny"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def test_flow_schedule_is_the_flow_match_euler_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=flow_timesteps(STEPS, 1.0)[:-1].tolist())
    torch.testing.assert_close(scheduler.sigmas.double(), flow_timesteps(STEPS, 3.0), atol=1e-6, rtol=0)


def test_an_imported_pipeline_folder_samples_what_diffusers_samples(sd3_folder, tmp_path):
    folder, pipe = sd3_folder
    assert cli_main(["convert", "diffusers-sd3", str(folder), str(tmp_path / "run")]) == 0
    cfg = load_run_config(tmp_path / "run")
    assert cfg.text.padding == "max_length" and cfg.codec.source == str(folder.resolve() / "vae")
    ours = Pipeline.load(tmp_path / "run", device="cpu")
    assert ours.conditioning.encoder.dim == 48 and ours.conditioning.encoder.pooled_dim == 20
    with torch.no_grad():
        x = generate(ours.model, ours.cfg, PROMPTS, conditioning=ours.conditioning, codec=ours.codec, steps=STEPS,
                     guidance=GUIDANCE, seed=SEED)[:, :, 0]
        noise = torch.randn(len(PROMPTS), 4, 1, 8, 8, generator=torch.Generator().manual_seed(SEED))[:, :, 0]
        theirs = pipe(PROMPTS, negative_prompt="", height=16, width=16, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, latents=noise, sigmas=flow_timesteps(STEPS, 1.0)[:-1].tolist(),
                      output_type="pt").images
    assert theirs.std() > 0.05  # pictures, not a constant
    torch.testing.assert_close(((x + 1) / 2).clamp(0, 1), theirs, atol=2e-4, rtol=0)


def test_a_pipeline_folder_without_t5_imports_with_placeholders_and_says_so(sd3_folder, tmp_path):
    import shutil

    folder, _ = sd3_folder
    partial = tmp_path / "no-t5"
    shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    with pytest.warns(UserWarning, match="has no text_encoder_3: the run names MiniLM and no codec as placeholders"):
        assert cli_main(["convert", "diffusers-sd3", str(partial), str(tmp_path / "run")]) == 0
    cfg = load_run_config(tmp_path / "run")
    assert (cfg.text.encoder, cfg.text.padding, cfg.codec.source) == ("minilm", "longest", "identity")


def test_a_transformer_saved_alone_takes_text_encoders_and_vae_from_pipeline(sd3_folder, tmp_path, capsys):
    folder, _ = sd3_folder
    assert cli_main(["convert", "diffusers-sd3", str(folder), str(tmp_path / "whole")]) == 0
    alone = str(folder / "transformer")
    assert cli_main(["convert", "diffusers-sd3", alone, str(tmp_path / "alone")]) == 0
    assert load_run_config(tmp_path / "alone").text.encoder == "minilm"  # placeholders without --pipeline
    assert cli_main(["convert", "diffusers-sd3", alone, str(tmp_path / "run"), "--pipeline", str(folder)]) == 0
    assert (tmp_path / "run" / "config.toml").read_text() == (tmp_path / "whole" / "config.toml").read_text()
    cfg = load_run_config(tmp_path / "run")
    assert (cfg.text.padding, cfg.codec.source) == ("max_length", str(folder.resolve() / "vae"))

    capsys.readouterr()
    rc = cli_main(["convert", "diffusers-sd3", alone, str(tmp_path / "bad"), "--pipeline", alone])
    assert rc == 2 and "not a diffusers pipeline folder (no model_index.json)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    rc = cli_main(["convert", "diffusers-dit", alone, str(tmp_path / "dit"), "--pipeline", str(folder)])
    assert rc == 2 and "--pipeline is for diffusers-sd3 imports" in capsys.readouterr().err
