"""In-process material for the hostile-input and credential tests.

P2 side: a tiny random Llama (tests.cloud_service.helpers.CONFIG), transformed once, pushed under
two deployments signed by the same P1 key, as the real P1 signs every deployment's credentials
with its one key: a genuine credential of the other deployment verifies, and its deployment
claim is all that keeps it out. A third deployment comes from another P1, with its own key.
P1 side: the same kind of model directory with tokenizer files, served with the fake P2
transport of tests/developer_service.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from shared import wire
from shared.api import INPUTS_EMBEDS, LOGITS
from shared.checkpoint import transform_model_dir
from shared.credentials import Signer
from shared.permutation import permute, unpermute
from stip_demo.models import copy_tokenizer
from tests.cloud_service.helpers import CONFIG, DEPLOYMENT, Deployed
from tests.support import random_causal_lm

OTHER_DEPLOYMENT = "dep-other"  # a second deployment of the same P1, signed by the same key
FOREIGN_DEPLOYMENT = "dep-foreign"  # a deployment another P1 (another model owner) pushed to P2


@dataclass
class CloudModel:
    """The tiny Llama, its key version 1 for P2, and the signing keys of the two P1s."""

    original: transformers.PreTrainedModel
    v1: Deployed
    signer: Signer  # P1's one key: DEPLOYMENT and OTHER_DEPLOYMENT
    foreign_signer: Signer  # another P1's key: FOREIGN_DEPLOYMENT

    def signer_of(self, deployment_id: str) -> Signer:
        return self.foreign_signer if deployment_id == FOREIGN_DEPLOYMENT else self.signer

    def credential(self, deployment_id: str = DEPLOYMENT, *, subject: str = "alice", ttl_s: int = 3600) -> str:
        token, _ = self.signer_of(deployment_id).issue(subject=subject, deployment_id=deployment_id, ttl_s=ttl_s)
        return token

    def push_body(self, deployment_id: str = DEPLOYMENT) -> tuple[bytes, str]:
        return self.v1.body(self.signer_of(deployment_id), deployment_id=deployment_id)

    def valid_request(self, seed: int = 0) -> tuple[bytes, torch.Tensor]:
        """A forward body (token embeddings permuted by π) and the plaintext logits it must give."""
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            x = self.original.get_input_embeddings()(ids)  # (B, S, d)
            logits = self.original(input_ids=ids).logits  # (B, S, V)
        return wire.encode({INPUTS_EMBEDS: permute(x, self.v1.pi)}), logits

    def logits_of(self, body: bytes) -> torch.Tensor:
        """P3's side of an answer: the logits un-permuted by π_c."""
        tensors, _ = wire.decode(body)
        return unpermute(tensors[LOGITS], self.v1.pi_c)


def build_cloud_model(root: Path) -> CloudModel:
    model = random_causal_lm(CONFIG, seed=1)
    model.save_pretrained(root / "llama")
    result = transform_model_dir(root / "llama", root / "v1", key_version=1, progress=False)
    return CloudModel(model, Deployed(result, 1), Signer.generate(), Signer.generate())


def developer_model_dir(root: Path) -> Path:
    """A random tiny LlamaForCausalLM directory with tokenizer files, as P1 registers it."""
    path = root / "llama-p1"
    model = random_causal_lm(CONFIG, seed=2)
    model.save_pretrained(path)
    copy_tokenizer(path)
    return path
