"""P2 with the mixture-of-experts and ViT families: a push carrying the embedding module is
refused; θ′ in the checkpoint layout loads (experts fused, ViT renamed) and a forward over HTTP
equals the stock class on the original weights."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from shared import wire
from shared.api import (
    E_BAD_INPUT,
    HIDDEN_STATES,
    INPUTS_EMBEDS,
    LOGITS,
    POOLED,
    PUSH_CONFIG,
    PUSH_DEPLOYMENT,
    PUSH_FAMILY,
    PUSH_KEY_VERSION,
    PUSH_VERIFY_KEY,
)
from shared.checkpoint import transform_model_dir
from shared.credentials import Signer
from shared.families import get_family
from shared.permutation import permute, unpermute
from tests.cloud_service.helpers import DEPLOYMENT, Deployed, assert_error, decoded, forward, push, serve
from tests.support import assert_close, max_abs_diff, randomize_parameters

MOE = dict(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=4
)
MODELS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**MOE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **MOE, moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2
        )
    ),
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**VIT, num_labels=5)),
    "vit_model": lambda: transformers.ViTModel(transformers.ViTConfig(**VIT)),
}
# the embedding module, as the checkpoint names it: what P2 must never accept
EMBEDDING = {
    "mixtral": "model.embed_tokens.weight",
    "qwen2_moe": "model.embed_tokens.weight",
    "vit": "vit.embeddings.patch_embeddings.projection.weight",
    "vit_model": "embeddings.position_embeddings",
}


@pytest.fixture(scope="module", params=list(MODELS))
def deployed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    kind = request.param
    model = randomize_parameters(MODELS[kind](), scale=0.2, seed=3)
    model.config.architectures = [type(model).__name__]
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path / "model")
    result = transform_model_dir(path / "model", path / "out", progress=False)
    assert result.family == kind
    return kind, model, Deployed(result, 1)


def _body(d: Deployed, signer: Signer, extra: Path | None = None) -> tuple[bytes, str]:
    config = json.loads((d.result.out_dir / "cloud" / "config.json").read_text())
    metadata = {
        PUSH_DEPLOYMENT: DEPLOYMENT,
        PUSH_FAMILY: d.result.family,
        PUSH_CONFIG: json.dumps(config),
        PUSH_KEY_VERSION: "1",
        PUSH_VERIFY_KEY: signer.public_key,
    }
    files = [*d.result.cloud_files, *([extra] if extra else [])]
    _, chunks = wire.concat_files(files, metadata)
    body = b"".join(chunks)
    return body, hashlib.sha256(body).hexdigest()


def test_push_with_the_embedding_is_refused_then_theta_prime_serves_exactly(
    deployed: tuple, tmp_path: Path, signer: Signer
) -> None:
    kind, model, d = deployed
    name = EMBEDDING[kind]
    extra = tmp_path / "embedding.safetensors"
    save_file({name: model.state_dict()[name].contiguous()}, str(extra))
    with serve(tmp_path / "data") as client:
        body, digest = _body(d, signer, extra)
        assert "embedding" in assert_error(push(client, body, digest), 400, E_BAD_INPUT)
        body, digest = _body(d, signer)
        assert push(client, body, digest).status_code == 200, "the same push without it is accepted"
        token, _ = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=600)
        family, key, config = get_family(kind), d.result.key, model.config.to_dict()
        with torch.no_grad():
            if kind.startswith("vit"):
                pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
                ref = model(pixel_values=pixels)
                user = load_file(str(d.result.out_dir / "user" / "embedding.safetensors"))
                x = family.embed_images(user, config, pixels)  # type: ignore[attr-defined]
            else:
                ids = torch.randint(0, 53, (2, 6), generator=torch.Generator().manual_seed(4))
                ref = model(input_ids=ids)
                x = model.get_input_embeddings()(ids)
        out, _ = decoded(forward(client, token, {INPUTS_EMBEDS: permute(x, key.pi)}, key_version=1, output="all"))
        if kind == "vit_model":
            assert_close(ref.last_hidden_state, unpermute(out[HIDDEN_STATES], key.pi))
            assert max_abs_diff(ref.pooler_output, unpermute(out[POOLED], key.pi)) <= 1e-4
        elif kind == "vit":
            assert out[LOGITS].shape == (2, 1, 5)  # class logits, permuted by π_c
            assert_close(ref.logits, unpermute(out[LOGITS][:, 0], key.pi_c))
        else:
            assert_close(ref.logits, unpermute(out[LOGITS], key.pi_c))
