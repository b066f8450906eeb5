"""`client.classify`, `client.image_logits`, `client.embed_images` and `stip classify` on tiny
random ViTs (with their image processor's config), against the fake P1 and P2, compared with
the stock classes run on the image processor's own output."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from shared.checkpoint import transform_model_dir
from shared.runtime import load_cloud_model
from tests.support import TOL, assert_close, max_abs_diff, randomize_parameters
from tests.user_client.conftest import CLOUD_URL, CREDENTIAL, DEVELOPER_URL
from tests.user_client.fakes import CloudState, DeveloperState, SyncASGITransport, cloud_app, developer_app
from user_client import BundleError, StipClient, cli, commands
from user_client.images import PREPROCESSOR_FILE

LABELS = ["tabby", "tiger", "ocelot", "lynx", "puma"]
VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=4
)


def _processor() -> Any:
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    root = tmp_path_factory.mktemp("vit")
    classifier = transformers.ViTForImageClassification(
        transformers.ViTConfig(**VIT, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    )
    encoder = transformers.ViTModel(transformers.ViTConfig(**VIT))
    out = {}
    for name, model, seed in (("vit", classifier, 1), ("vit_model", encoder, 2)):
        randomize_parameters(model, scale=0.2, seed=seed)
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(root / name)
        _processor().save_pretrained(root / name)
        out[name] = (model, transform_model_dir(root / name, root / f"{name}-out", progress=False))
    return out


@pytest.fixture
def world(models: dict, tmp_path: Path) -> Iterator[tuple[Callable[..., StipClient], CloudState]]:
    developer = DeveloperState(credential=CREDENTIAL, cloud_url=CLOUD_URL)
    cloud = CloudState(credential=CREDENTIAL)
    for dep, (_, result) in models.items():
        developer.bundles[dep] = {1: result.out_dir / "user"}
        developer.current[dep] = 1
        config = json.loads((result.out_dir / "cloud" / "config.json").read_text())
        cloud.models[dep] = {1: load_cloud_model(config, result.cloud_files, family=result.family)}
        cloud.active[dep] = 1
    dt, ct = SyncASGITransport(developer_app(developer)), SyncASGITransport(cloud_app(cloud))
    clients: list[StipClient] = []

    def make(deployment_id: str = "vit", **kw: Any) -> StipClient:
        kw.setdefault("developer_transport", dt)
        kw.setdefault("cloud_transport", ct)
        client = StipClient(
            DEVELOPER_URL, deployment_id=deployment_id, credential=CREDENTIAL, cache_dir=tmp_path / "cache", **kw
        )
        clients.append(client)
        return client

    try:
        yield make, cloud
    finally:
        for c in clients:
            c.close()
        dt.shutdown()
        ct.shutdown()


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8)) for i in range(n)]


def test_classify_equals_the_stock_model_on_the_processors_pixels(world: tuple, models: dict) -> None:
    make, cloud = world
    model, _ = models["vit"]
    imgs = random_images(3)
    with torch.no_grad():
        ref = model(pixel_values=_processor()(images=imgs, return_tensors="pt")["pixel_values"]).logits
    client = make()
    got = client.image_logits(imgs, batch_size=2)  # two requests: 2 + 1 images
    assert_close(ref, got)
    assert [f["shape"] for f in cloud.forwards] == [(2, 17, 32), (1, 17, 32)]  # x·π only: (n, 1 + 16 patches, d)
    assert all(f["names"] == ["inputs_embeds"] for f in cloud.forwards)
    top = client.classify(imgs, top_k=3)
    probs = ref.softmax(-1)
    for row, p in zip(top, probs, strict=True):
        assert [c.class_id for c in row] == p.argsort(descending=True)[:3].tolist()
        assert [c.label for c in row] == [LABELS[c.class_id] for c in row]
        # softmax of logits computed in another order (θ′ on x·π): within the fp32 bound they meet
        assert max(abs(c.score - float(p[c.class_id])) for c in row) <= TOL
    every = client.classify(imgs[0], top_k=None)
    assert len(every) == 1 and sorted(c.label for c in every[0]) == sorted(LABELS)


def test_classify_reads_image_files(world: tuple, models: dict, tmp_path: Path) -> None:
    make, _ = world
    model, _ = models["vit"]
    imgs = random_images(2, seed=5)
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for img, path in zip(imgs, paths, strict=True):
        img.save(path)
    with torch.no_grad():
        pixels = _processor()(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
        ref = model(pixel_values=pixels["pixel_values"]).logits
    assert_close(ref, make().image_logits([str(p) for p in paths]))
    with pytest.raises(ValueError, match="cannot read the image"):
        make().classify(str(tmp_path / "missing.png"))


def test_embed_images_on_a_vit_model(world: tuple, models: dict) -> None:
    make, _ = world
    model, _ = models["vit_model"]
    imgs = random_images(2, seed=7)
    with torch.no_grad():
        ref = model(pixel_values=_processor()(images=imgs, return_tensors="pt")["pixel_values"])
    out = make("vit_model").embed_images(imgs)
    assert_close(ref.last_hidden_state, out.hidden_states)
    assert out.pooled is not None and max_abs_diff(ref.pooler_output, out.pooled) <= 1e-4
    with pytest.raises(ValueError, match="classifier"):
        make("vit_model").classify(imgs)
    with pytest.raises(ValueError, match="ViTModel"):
        make("vit").embed_images(imgs)


def test_a_bundle_without_the_image_processor_says_what_to_do(world: tuple, models: dict) -> None:
    make, _ = world
    client = make()
    bundle = client.bundle
    (bundle.path / PREPROCESSOR_FILE).rename(bundle.path / "moved.json")
    try:
        with pytest.raises(BundleError, match="preprocessor_config.json.*model directory"):
            client.classify(random_images(1))
    finally:
        (bundle.path / "moved.json").rename(bundle.path / PREPROCESSOR_FILE)


def test_stip_classify(
    world: tuple, models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make, _ = world
    paths = []
    for i, img in enumerate(random_images(2, seed=9)):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    expected = make().classify(paths, top_k=2)
    monkeypatch.setattr(commands, "StipClient", lambda *a, deployment_id, **kw: make(deployment_id))
    code = cli.main(["classify", *paths, "--top-k", "2", "--deployment", "vit", "--developer-url", DEVELOPER_URL])
    out = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == paths
    assert [[(c["label"], c["class_id"]) for c in r["classes"]] for r in rows] == [
        [(c.label, c.class_id) for c in row] for row in expected
    ]
    assert rows[0]["classes"][0]["score"] == pytest.approx(expected[0][0].score)
