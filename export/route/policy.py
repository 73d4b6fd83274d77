"""The routing policy's shape, written once: ``RoutingPolicy`` (schema ``distill-routing/v2``).

The route stage builds one and writes it as ``routing_policy.json``; the Router validates every policy it is given
through it (``validate``: a PolicyError names the field); ``POLICY_JSON_SCHEMA`` in ``export.route.router`` is
``RoutingPolicy.model_json_schema()``. Like a recipe ``Section`` the models are strict and frozen, but unknown
fields are kept rather than refused: the Router reads every ``distill-routing/v2.x`` policy, and a later minor
version may add fields. What describes the fit rather than drives a decision (``calibration``, ``operating_point``,
``drift``, ``gateways``) is kept as written, a plain JSON object.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from export.route.signals import SIGNALS

POLICY_SCHEMA = "distill-routing/v2"
POLICY_FILE = "routing_policy.json"
EXTRAS = "routing"  # the policy's other files, in a subfolder so that no weight-file glob of the artefact sees them

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class PolicyError(ValueError):
    """A routing policy that cannot be used: unknown schema version, missing or tampered files."""


class PolicyPart(BaseModel):
    """A part of the policy: types are checked strictly (no "yes" for true), values are read-only, and fields a
    later minor version adds are kept."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, allow_inf_nan=False)


class StudentInfo(PolicyPart):
    name: str | None = Field(None, description="The student's model name (recipe export.model_name), published with it.")
    train_fingerprint: str | None = Field(None, description="Fingerprint of the train stage that made the student.")


class TeacherInfo(PolicyPart):
    models: list[str] = Field(description="The teacher models named in the training records.")


class QualityTarget(PolicyPart):
    metric: str = Field(description="How a student answer was scored against the teacher's (route.quality_metric).")
    tolerance: float = Field(description="Routed quality may fall at most this far below the teacher's.")
    guarantee: str | None = Field(None, description="'estimate' or 'lower_bound': which routed quality had to stay within.")
    confidence_level: float | None = Field(None, description="Level of the bootstrap confidence intervals.")


class PolicyFile(PolicyPart):
    file: str = Field(description="The file's path relative to the policy's folder.")
    sha256: Sha256 = Field(description="Its sha256; the Router refuses a file that does not match.")


class LengthRule(PolicyPart):
    count: Literal["exact", "bounded", "estimate"] = Field(
        "exact", description="How input length is counted (see export.route.signals.TokenCounter)."
    )


class LanguageModel(PolicyPart):
    detector: str | None = Field(None, description="Which language detector (fastText lid.176) and its licence.")
    file: str = Field(description="The detector's model file, relative to the policy's folder.")
    sha256: Sha256 = Field(description="Its sha256; the Router refuses a file that does not match.")
    min_confidence: float = Field(description="Detections below this probability block nothing.")


class EmbedderIdentity(PolicyPart):
    name: str = Field(description="The sentence embedder's name (all-MiniLM-L6-v2).")
    package: str | None = Field(None, description="The package and version that ship its weights.")
    weights_sha256: Sha256 = Field(description="sha256 of its weights: the Router refuses a different embedder.")
    dim: int | None = Field(None, description="Embedding dimension.")
    normalized: bool | None = Field(None, description="Whether embeddings are unit-norm.")
    text: str | None = Field(None, description="What text of a request is embedded.")


class DistanceReference(PolicyPart):
    method: Literal["knn-cosine"] = Field(description="Cosine distance to the k-th nearest training input.")
    k: int = Field(description="Which nearest training input the distance is measured to.")
    file: str = Field(description="The training embeddings per function (safetensors), relative to the policy's folder.")
    sha256: Sha256 = Field(description="Its sha256; the Router refuses a file that does not match.")


class ConfidenceSettings(PolicyPart):
    top_logprobs: int = Field(description="Top-k per token the student endpoint must return for the entropy signals.")


class TokenEstimate(PolicyPart):
    coef: list[float] = Field(description="tokens ~ coef[0] + coef[1] * bytes + coef[2] * spaces.")
    residual: list[float] = Field(description="The residual range of the fit (plus one token of slack): the bound.")
    fitted_on: int | None = Field(None, description="How many training inputs it was fitted on.")


class BeforeRule(PolicyPart):
    """Phase 1, before any model call."""

    max_input_tokens: int | None = Field(ge=0, description="Longer inputs (student tokens) go to the teacher.")
    token_estimate: TokenEstimate | None = Field(
        None, description="A bound on the token count from bytes and spaces, for length.count 'bounded'/'estimate'."
    )
    languages: list[str] | None = Field(None, description="Languages seen in training; others go to the teacher.")
    max_distance: float | None = Field(None, description="Inputs farther from the training inputs go to the teacher.")


class AfterRule(PolicyPart):
    """Phase 2, after the student answered."""

    signal: Literal[SIGNALS] = Field(description="The confidence signal of the student's answer.")  # type: ignore[valid-type]
    threshold: float | None = Field(description="Answers below it go to the teacher (null: keep every answer).")


class FunctionRule(PolicyPart):
    enabled: bool = Field(True, description="False: every request of this function goes to the teacher.")
    why: str = Field("", description="Why the function is disabled.")
    before: BeforeRule = Field(description="The pre-generation rules.")
    after: AfterRule = Field(description="The post-generation rule.")
    calibration: dict[str, Any] | None = Field(
        None, description="What the held-out records gave at the chosen threshold: share, quality, intervals."
    )


class RoutingPolicy(PolicyPart):
    """``routing_policy.json``: which requests the student may answer, per function, and the files that needs."""

    model_config = ConfigDict(title="distill routing policy v2")

    schema_: Annotated[str, StringConstraints(pattern=r"^distill-routing/v2(\.\d+)*$")] = Field(
        alias="schema", description="The policy's schema and version: distill-routing/v2 or a later v2.x.")
    created_at: str | None = Field(None, description="When the route stage wrote it (local time).")
    student: StudentInfo | None = Field(None, description="The student the policy was fitted for.")
    teacher: TeacherInfo | None = Field(None, description="The teacher it escalates to.")
    quality: QualityTarget | None = Field(None, description="What the thresholds were chosen to keep.")
    tokenizer: PolicyFile | None = Field(description="The student's tokenizer.json: input length is counted with it.")
    length: LengthRule = Field(default_factory=LengthRule, description="How input length is counted.")
    language: LanguageModel | None = Field(None, description="The language detector; null: no language rule.")
    embedder: EmbedderIdentity | None = Field(None, description="The sentence embedder the distances are measured in.")
    distance: DistanceReference | None = Field(
        None, description="Unit-norm training embeddings per function (safetensors); null: no distance rule."
    )
    confidence: ConfidenceSettings | None = Field(None, description="What the post-generation signals need.")
    unknown_function: Literal["teacher"] = Field(description="Where requests of an unknown function go.")
    functions: dict[str, FunctionRule] = Field(description="Per function: its rules.")
    operating_point: dict[str, Any] | None = Field(
        None, description="The held-out share, quality, cost and their bootstrap intervals."
    )
    drift: dict[str, Any] | None = Field(
        None, description="Per function, the reference distributions `distill route-check` compares live traffic with."
    )
    gateways: dict[str, Any] | None = Field(None, description="The gateway configs beside it and what they cannot express.")
    files: dict[str, Sha256] | None = Field(
        None, description="{relative name: sha256} of every file beside the policy that it needs (published with it)."
    )
    upgraded_from: str | None = Field(None, description="Set in memory when the Router upgraded an older policy.")

    def to_json_dict(self) -> dict[str, Any]:
        """The policy as written: the fields that were given, in this order, under their JSON names."""
        return self.model_dump(by_alias=True, exclude_unset=True)


def validate(policy: dict[str, Any], where: str = "routing policy") -> RoutingPolicy:
    """The policy as a RoutingPolicy; PolicyError naming the first field that is wrong."""
    try:
        return RoutingPolicy.model_validate(policy)
    except ValidationError as err:
        e = err.errors()[0]
        field = "/".join(str(p) for p in e["loc"]) or "(top level)"
        raise PolicyError(f"{where}: {field}: {e['msg']}") from None
