"""`kandlab generate`: works offline on the shipped model; refuses bad input before sampling."""
import pytest
from PIL import Image

from kandlab import cli, weights

SHIPPED = "pixel_text.safetensors" in weights.read_manifest()


@pytest.mark.parametrize("argv, message", [
    (["two red cirles"], "did you mean circles"),
    (["one purple dog"], "'dog'"),
    ([""], "empty"),
    (["one red circle", "--steps", "0"], "steps=0"),
    (["one red circle", "--steps", "5000"], "1 to 1000"),
    (["one red circle", "--guidance", "-2"], ">= 0"),
    (["one red circle", "-n", "0"], "images_per_prompt"),
    (["one red circle", "-o", "/nonexistent-folder/out.png"], "does not exist"),
    (["one red circle", "-o", "out.txt"], "must end in"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import os
    if os.access(locked, os.W_OK):  # root ignores permissions
        pytest.skip("running as root: every folder is writable")
    assert cli.main(["generate", "one red circle", "-o", str(locked / "x.png")]) == 2
    assert "permission" in capsys.readouterr().err


def test_missing_model_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KANDLAB_DATA", str(tmp_path))
    assert cli.main(["generate", "one red circle", "-o", str(tmp_path / "x.png")]) == 2
    assert "kandlab train" in capsys.readouterr().err


@pytest.mark.skipif(not SHIPPED, reason="pixel_text not shipped yet")
def test_generate_writes_an_image_and_a_grid(tmp_path, capsys):
    one, grid = tmp_path / "one.png", tmp_path / "grid.png"
    assert cli.main(["generate", "two red circles above a blue square", "-o", str(one), "--steps", "3"]) == 0
    assert Image.open(one).size == (128, 128)
    assert cli.main(["generate", "one green triangle", "-o", str(grid), "--steps", "2", "-n", "4",
                     "--sampler", "ddpm", "--seed", "3", "--upscale", "1", "--start", "data-mean"]) == 0
    assert Image.open(grid).size == (66, 66)  # 2×2 tiles of 32 px with a 2 px gap
    assert "wrote" in capsys.readouterr().out


def test_unknown_start_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "one red circle", "--start", "zeros"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(not SHIPPED, reason="pixel_text not shipped yet")
def test_too_many_images_fail_fast_with_the_largest_that_fits(capsys, tmp_path, monkeypatch):
    """`-n 100000` would need hundreds of GiB in one batch: refused before loading, with the largest n that fits
    (from the card's UNet config and the available memory), and the Python API says the same."""
    import time

    from kandlab import pipeline
    from kandlab.pipeline import Pipeline, max_images
    from kandlab.unet import UNetConfig

    monkeypatch.setattr(pipeline, "available_memory", lambda: 16 * 2 ** 30)  # the same number for both calls
    card = weights.load_card("pixel_text.safetensors")
    most = max_images(UNetConfig(**card["unet_config"]), card["recipe"]["image_size"])
    began = time.perf_counter()
    assert cli.main(["generate", "one red circle", "-n", "100000", "-o", str(tmp_path / "x.png")]) == 2
    assert time.perf_counter() - began < 0.5
    err = capsys.readouterr().err
    assert f"at most {most} images fit" in err and "Traceback" not in err and not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError) as api:
        Pipeline.from_tiny("pixel_text")("one red circle", images_per_prompt=100000, progress=False)
    assert err.strip() == f"kandlab generate: {api.value}"


def test_an_upscale_too_large_for_memory_is_refused_with_the_largest_that_fits(capsys, tmp_path, monkeypatch):
    from kandlab import pipeline

    monkeypatch.setattr(pipeline, "available_memory", lambda: 2 ** 30)
    most = max(u for u in range(1, 2000) if cli.png_bytes(1, 32, u) <= 0.8 * 2 ** 30)
    cli.check_png_memory(1, 32, most)  # the largest that fits passes
    with pytest.raises(ValueError, match=f"largest --upscale that fits for 1 image is {most}$"):
        cli.check_png_memory(1, 32, most + 1)
    if SHIPPED:
        assert cli.main(["generate", "one red circle", "--upscale", "100000", "-o", str(tmp_path / "x.png")]) == 2
        assert f"is {most}" in capsys.readouterr().err


def test_sampling_defaults_come_from_the_model():
    """--guidance and --threshold default to None: the model card's guidance, and the pipeline's threshold (static
    for a pixel model, none for a latent one, whose latents have no [-1, 1] range to clip to)."""
    from kandlab import cli

    args = cli.build_parser().parse_args(["generate", "a red circle"])
    assert args.guidance is None and args.threshold is None


def test_unclip_refuses_options_it_does_not_have(tmp_path, capsys):
    from kandlab import cli

    assert cli.main(["generate", "a red circle", "--model", "unclip", "--sampler", "ddpm",
                     "-o", str(tmp_path / "x.png")]) == 2
    assert "DDIM" in capsys.readouterr().err
