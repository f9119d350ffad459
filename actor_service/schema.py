"""Wire format of the actor's weight endpoint (DESIGN.md §5). Light module: pydantic only.

`POST {actor}/v1/weights`
  headers: Authorization: Bearer <token>, X-TBRM-Policy-Version: <int>, X-TBRM-Sha256: <hex of body>,
           Content-Type: application/octet-stream
  body:    a safetensors file with HF parameter names (never pickle)
  200 -> WeightUpdateResponse; 400 malformed/mismatched tensors or checksum; 401 token; 409 version not newer;
  413 body too large.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

VERSION_HEADER = "X-TBRM-Policy-Version"
SHA256_HEADER = "X-TBRM-Sha256"

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class WeightUpdateResponse(BaseModel):
    policy_version: int
    sha256: str
    nbytes: int
    receive_s: float = Field(description="seconds spent receiving and verifying the body")
    load_s: float = Field(description="seconds spent applying the weights to the running engine")


class ActorStatus(BaseModel):
    actor_id: str
    policy_version: int
    model: str
    state: str
    trajectories: int = 0
    tokens_generated: int = 0
    tokens_per_s: float = 0.0
    last_batch_s: float = 0.0
    last_update_s: float = 0.0
