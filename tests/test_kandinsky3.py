"""kandlab.kandinsky3: a diffusers-format Kandinsky 3 folder read into kandlab's modules, matched against diffusers.

The tiny pipeline is built and saved by diffusers itself (`save_tiny_diffusers_pipeline`), so these tests exercise
the same files, layout and loading path as the published 24 GB model.
"""

import json

import pytest
import torch

from kandlab import kandinsky3 as k3

diffusers = pytest.importorskip("diffusers")

KW = dict(num_inference_steps=4, height=128, width=128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("k3tiny")
    k3.save_tiny_diffusers_pipeline(path)
    return path


@pytest.fixture(scope="module")
def ref(folder):
    pipe = diffusers.Kandinsky3Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(folder):
    return k3.Kandinsky3Pipeline.from_pretrained(folder)


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("args", [
    dict(prompt="a red circle"),
    dict(prompt=["a red circle", "two blue squares left of a dog"]),
    dict(prompt="a red circle", negative_prompt="a blue square"),
    dict(prompt=["a cat", "a dog on a square"], negative_prompt=["a photo", "three triangles"]),
])
def test_text_to_image_matches_diffusers(ref, ours, args):
    a = ref(**args, generator=_gen(), output_type="pt", **KW).images
    b = ours(**args, generator=_gen(), output_type="pt", progress=False, **KW)
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())


def test_same_latents_match_diffusers(ref, ours):
    latents = torch.randn(1, 4, 16, 16, generator=_gen(7))
    a = ref("a green triangle", latents=latents.clone(), generator=_gen(), output_type="pt", **KW).images
    b = ours("a green triangle", latents=latents.clone(), generator=_gen(), progress=False, **KW)
    assert (a - b).abs().max() <= 1e-4


def test_img2img_matches_diffusers(ref, ours):
    pipe = diffusers.Kandinsky3Img2ImgPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=_gen(1))
    for strength in (0.3, 0.75):
        a = pipe("a cat", image=image, strength=strength, num_inference_steps=10, generator=_gen(1),
                 output_type="pt").images
        b = ours.img2img("a cat", image, strength=strength, num_inference_steps=10, generator=_gen(1), progress=False)
        assert (a - b).abs().max() <= 1e-4


def test_fp64_agrees_to_rounding(folder, ref):
    """In float64 the two implementations agree to rounding — at diffusers' own (chaotic) init too."""
    ours = k3.Kandinsky3Pipeline.from_pretrained(folder, torch_dtype=torch.float64)
    ref64 = diffusers.Kandinsky3Pipeline(**{k: (v.to(torch.float64) if hasattr(v, "parameters") else v)
                                            for k, v in ref.components.items()})
    ref64.set_progress_bar_config(disable=True)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=_gen())
    text = torch.randn(2, 5, 32, dtype=torch.float64, generator=_gen(2))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)  # one fully masked row
    a = ref64.unet(x, torch.tensor(500), encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False)[0]
    b = ours.unet(x, torch.full((2,), 500), text, mask)
    assert (a - b).abs().max() < 1e-10


def test_timesteps_and_previous_match_diffusers(ref):
    s = k3.SchedulerSettings.from_config(dict(ref.scheduler.config))
    for n in (1, 4, 25, 50):
        ref.scheduler.set_timesteps(n)
        assert s.timesteps(n) == ref.scheduler.timesteps.tolist()
        assert [s.previous(t, n) for t in s.timesteps(n)] == \
               [max(int(ref.scheduler.previous_timestep(torch.tensor(t))), -1) for t in s.timesteps(n)]
    assert s.timesteps(25)[:2] == [961, 921] and s.timesteps(25)[-1] == 1


def test_cut_context_and_encode_prompt_match_diffusers(ref, ours):
    pe, ne, am, nm = ref.encode_prompt("a red circle left of a dog", True, device="cpu",
                                       negative_prompt="a photo", _cut_context=True)
    e, m, n, n_mask = ours.encode_prompt("a red circle left of a dog", "a photo")
    assert e.shape == pe.shape and m.tolist() == am.tolist() and n_mask.tolist() == nm.tolist()
    assert (e - pe).abs().max() < 1e-6 and (n - ne).abs().max() < 1e-6
    embeds = torch.randn(2, 128, 8)
    mask = torch.zeros(2, 128, dtype=torch.long)
    mask[0, :5], mask[1, :9] = 1, 1
    cut, cut_mask = k3.cut_context(embeds, mask)
    assert cut.shape == (2, 10, 8) and cut_mask.shape == (2, 10)  # longest prompt (9 tokens) + 1
    assert (cut[0, 5:] == 0).all() and (cut[1, 9] == 0).all() and torch.equal(cut[1, :9], embeds[1, :9])


def test_start_timesteps_is_diffusers_get_timesteps():
    ts = k3.SchedulerSettings().timesteps(25)
    assert k3.start_timesteps(ts, 0.3) == ts[-7:] and k3.start_timesteps(ts, 0.3)[0] == 241
    assert k3.start_timesteps(ts, 1.0) == ts
    with pytest.raises(ValueError, match="0 steps"):
        k3.start_timesteps(ts, 0.01)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        k3.start_timesteps(ts, 1.5)


def test_latent_size_is_diffusers():
    assert k3.latent_size(1024, 1024) == (128, 128)
    assert k3.latent_size(1000, 520) == (128, 72)  # 8·⌈H/64⌉
    with pytest.raises(ValueError, match="positive int"):
        k3.latent_size(0, 64)


def test_bad_input_is_explained(ours):
    with pytest.raises(ValueError, match="latents have shape"):
        ours("a cat", latents=torch.randn(1, 4, 8, 8), progress=False, **KW)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours("a cat", num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        ours("a cat", guidance_scale=-1.0)
    with pytest.raises(TypeError, match="prompt"):
        ours(None)
    with pytest.raises(ValueError, match="negative prompts"):
        ours(["a cat", "a dog", "a red square"], negative_prompt=["a", "b"], progress=False, **KW)
    with pytest.raises(ValueError, match="output_type"):
        ours("a cat", output_type="png")
    with pytest.raises(ValueError, match="sampler"):
        ours("a cat", sampler="euler")
    with pytest.raises(ValueError, match="one image per prompt"):
        ours.img2img(["a cat", "a dog"], torch.rand(1, 3, 32, 32), progress=False)
    with pytest.raises(ValueError, match="RGB"):
        ours.img2img("a cat", torch.rand(1, 4, 32, 32), progress=False)


def test_folder_errors_say_what_to_do(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        k3.Kandinsky3Pipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match="not a Kandinsky3Pipeline"):
        k3.Kandinsky3Pipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="Load without variant"):
        k3.weight_files(folder / "unet", "diffusion_pytorch_model", "fp16")


def test_sharded_and_variant_checkpoints_load(folder, ours, tmp_path):
    """The hub's text encoder is sharded with an index, and the fp16 files are a variant."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(state)
    shards = {"diffusion_pytorch_model.fp16-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model.fp16-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k].half() for k in part}, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((folder / "unet" / "config.json").read_text())
    assert len(k3.weight_files(tmp_path, "diffusion_pytorch_model", "fp16")) == 2
    unet = k3.load_unet(tmp_path, variant="fp16")
    assert next(unet.parameters()).dtype == torch.float16
    for (name, p), q in zip(unet.named_parameters(), ours.unet.parameters()):
        assert torch.equal(p, q.half()), name


def test_loading_adopts_the_memory_mapped_tensors(folder):
    """No copy: the loaded UNet's parameters are the safetensors file's own mmap-backed tensors."""
    files = k3.weight_files(folder / "unet", "diffusion_pytorch_model")
    state = k3.load_safetensors(files)
    config = k3.unet_config_from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
    unet = k3.UNet.from_diffusers(state, config)
    theirs = unet.to_diffusers_state_dict()
    assert all(theirs[k].data_ptr() == v.data_ptr() for k, v in state.items())
    # a bf16 load converts once, tensor by tensor
    assert next(k3.load_unet(folder / "unet", torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_original_sampler_and_callback(ours):
    seen = []
    image = ours("a red circle", sampler="original", callback=lambda i, t, z: seen.append((i, t, z.shape)),
                 generator=_gen(), progress=False, **KW)
    assert [t for _, t, _ in seen] == k3.SchedulerSettings().timesteps(4)
    assert seen[0][2] == (1, 4, 16, 16) and image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_latent_preview_fits_decodes(ours):
    images = torch.rand(4, 3, 32, 32, generator=_gen()) * 2 - 1
    preview = k3.LatentPreview.fit(ours.movq, images)
    z = ours.movq.encode(images)
    rgb = preview(z)
    assert rgb.shape == (4, 3, 16, 16) and 0 <= rgb.min() and rgb.max() <= 1
    target = (torch.nn.functional.adaptive_avg_pool2d(ours.movq.decode(z), (16, 16)) * 0.5 + 0.5).clamp(0, 1)
    constant = (target - target.mean((0, 2, 3), keepdim=True)).pow(2).mean()
    assert (rgb - target).pow(2).mean() < constant  # better than predicting the mean colour


def test_offload_on_cpu_says_why(ours):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no.*GPU|has none"):
        ours.enable_model_offload()


def test_repo_id_offline_raises_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(k3.OfflineError, match="hf download kandinsky-community/kandinsky-3"):
        k3.Kandinsky3Pipeline.from_pretrained("kandinsky-community/kandinsky-3", variant="fp16")


def test_published_parameter_counts_on_meta():
    counts = {name: k3.parameter_count(cls, cfg) for name, (cls, cfg) in k3.published_configs().items()}
    assert counts["unet"] == 3_055_348_228 and counts["movq"] == 270_669_103
    assert 8.6e9 < counts["text_encoder"] < 8.8e9  # Flan-UL2's encoder, ≈ 8.72 B


def test_plan_gives_numbers_for_common_gpus():
    plans = {g: k3.plan(g) for g in (16, 24, 40, 80)}
    w = plans[16].weights_gib
    assert abs(sum(w.values()) * k3.GIB / 1e9 - 24.1) < 0.4  # 11.9 B parameters in 16 bit ≈ 24 GB
    assert plans[16].strategies[0].fits is False  # a T4 cannot hold everything (diffusers issue #6028)
    assert plans[80].choice.name == "everything resident"
    assert plans[16].choice is not None and "CPU" in plans[16].choice.name
    for p in plans.values():
        assert all(s.peak_gib > 0 for s in p.strategies) and str(p).count("GiB") >= 7
    peaks = [plans[g].choice.peak_gib for g in (16, 24, 40, 80)]
    assert peaks == sorted(peaks)  # a bigger GPU never gets a leaner plan
    with pytest.raises(ValueError, match="dtype"):
        k3.plan(16, dtype="int3")
    with pytest.raises(ValueError, match="gpu_gib"):
        k3.plan(0)
