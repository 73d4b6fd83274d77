"""Recipe section `route`: how the routing policy is fitted, which signals it uses, and the gateway configs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import MAX_COUNT, Section

Signal = Literal["auto", "min_logprob", "p10_logprob", "mean_logprob", "mean_entropy", "max_entropy"]


class LanguageRule(Section):
    enabled: bool = Field(
        True, description="Send inputs in a language the student was not trained on to the teacher (fastText lid.176)."
    )
    min_records: int = Field(
        10, gt=0, le=MAX_COUNT, description="A language counts as trained for a function once this many training inputs are in it."
    )
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="Detections below this probability count as 'uncertain' and block nothing."
    )


class DistanceRule(Section):
    enabled: bool = Field(
        True,
        description="Send inputs far from the training inputs to the teacher: cosine distance to the k-th nearest "
        "training input in the MiniLM sentence-embedding space (extra 'semantic').",
    )
    k: int = Field(5, gt=0, le=1000, description="Which nearest training input the distance is measured to.")
    quantile: float = Field(
        0.99, gt=0, le=1,
        description="The distance limit is this quantile of held-out (val + test) in-domain distances, so about "
        "1 - quantile of in-domain traffic escalates on distance alone.",
    )
    max_reference: int = Field(
        20_000, gt=0, le=10_000_000, description="At most this many training inputs per function are kept as kNN reference."
    )


class GatewayConfig(Section):
    student_api_base: str = Field(
        "http://localhost:8000/v1", description="OpenAI-compatible endpoint serving the student (vLLM, llama.cpp)."
    )
    student_model: str | None = Field(
        None, description="Model name the student endpoint serves (default: export.model_name)."
    )
    student_key_env: str = Field("STUDENT_API_KEY", description="Name of the env var holding the student's API key.")
    teacher_model: str | None = Field(
        None, description="Teacher model as the gateway names it (default: openai/<the teacher model in the logs>)."
    )
    teacher_key_env: str = Field("OPENAI_API_KEY", description="Name of the env var holding the teacher's API key.")
    teacher_api_base: str | None = Field(
        None, description="OpenAI-compatible endpoint of the teacher for the gateway configs (default: the provider's "
        "own, e.g. https://api.openai.com/v1)."
    )
    router_api_base: str = Field(
        "http://localhost:8080/v1", description="Where `distill serve-router` listens, for gateways that delegate to it."
    )


class LiveConfig(Section):
    """The live loop around `distill serve-router` (docs/live.md): audits, shadow, canary, promotion, rollback."""

    log_dir: str = Field("logs/router", description="serve-router's --log-dir, where `distill live` reads the logs.")
    deployment: str | None = Field(
        None, description="The deployment file (default: <export.store>/<export.model_name>/deployment.json). It "
        "sits beside the versions it names: another path to that same folder (a shared disk's mount), not elsewhere."
    )
    audit_share: float = Field(
        0.02, ge=0, le=1,
        description="Share of student-answered requests also sent to the teacher in the background and scored "
        "(the teacher's answer joins the teacher log, marked as an audit). serve-router applies it with "
        "--deployment, or when the recipe sets it; a plain policy proxy audits nothing otherwise.",
    )
    canary_audit_share: float = Field(
        0.2, ge=0, le=1, description="Audit share of the requests a canary answers (evidence for promotion comes "
        "from these audits).",
    )
    shadow_share: float = Field(
        0.1, gt=0, le=1,
        description="Share of requests a candidate in shadow also answers in the background (a student-answered "
        "one is then audited too, so the shadow answer has the teacher's to be scored against).",
    )
    canary_share: float = Field(0.1, gt=0, lt=1, description="Share of traffic a candidate answers as canary.")
    escalation_block: int = Field(
        20, gt=0, le=10_000,
        description="The escalation guardrail tests the escalation rate of blocks of this many consecutive requests "
        "the student was asked (per function), not each request: requests escalate together (a client's batch, "
        "retries), and one by one they made a version at its calibrated rate look worse than it is.",
    )
    window_days: float = Field(
        14, gt=0, le=3650,
        description="`distill live --decide` reads the last this many days of logs: a version is judged on its "
        "evidence since it entered its stage, or within the window if that is later (the CUSUM detector only "
        "alarms less on a window, never more; each hourly run then reads a bounded amount of log).",
    )
    queue_size: int = Field(
        1000, gt=0, le=1_000_000,
        description="Background audits and shadow calls waiting at most; beyond it they are dropped and counted.",
    )
    workers: int = Field(4, gt=0, le=256, description="Background audits and shadow calls run at once.")
    max_quality_drop: float = Field(
        0.05, gt=0, lt=1,
        description="Guardrail: a version's audited answer quality may fall at most this far below its held-out "
        "quality (the policy's calibration, per function); promotion needs evidence it is above that floor.",
    )
    max_escalation_rise: float = Field(
        0.15, gt=0, lt=1,
        description="Guardrail: a version's escalation rate (escalated / asked) may rise at most this far above "
        "the calibrated one.",
    )
    alpha: float = Field(
        0.05, gt=0, lt=0.5,
        description="Level of the promotion test: the chance that a candidate whose quality is at its floor is "
        "promoted (moved to canary, or to serving) anyway.",
    )
    guardrail_alpha: float = Field(
        0.001, gt=0, lt=0.5,
        description="Level of the rollback test, split evenly over a version's tests (quality and escalation per "
        "function: 2 functions make 4): a version that holds its floors is rolled back by mistake at most about once "
        "per 1/guardrail_alpha scored answers.",
    )
    min_audits: int = Field(
        30, gt=0, le=MAX_COUNT, description="Scored answers a candidate needs before it may move on (shadow -> "
        "canary, canary -> promoted).",
    )
    reload_s: float = Field(
        1.0, gt=0, le=3600, description="How often serve-router checks the deployment file for changes (seconds).",
    )


class RouteConfig(Section):
    tolerance: float = Field(
        0.02, ge=0, le=1, description="Routed quality may fall at most this far below the teacher's (0.02 = 2 points)."
    )
    quality_metric: Literal["exact_match", "field_accuracy", "chrf"] = Field(
        "exact_match",
        description="How a student answer is scored against the teacher's: exact match, JSON field accuracy (exact "
        "match where the teacher's answer is not a JSON object), or chrF text overlap (0-1).",
    )
    guarantee: Literal["estimate", "lower_bound"] = Field(
        "estimate",
        description="'estimate': routed quality on the held-out records must be within tolerance; 'lower_bound': "
        "the bootstrap lower confidence bound of it must be (safer, sends less to the student).",
    )
    confidence_level: float = Field(0.95, gt=0.5, lt=1, description="Level of the bootstrap confidence intervals.")
    bootstrap: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples for the confidence intervals.")
    signal: Signal = Field(
        "auto",
        description="The post-generation confidence signal: a statistic of the student's token logprobs (min, "
        "10th percentile, mean) or of its top-k entropy (mean, max). 'auto' picks, per function, the one whose "
        "quality-vs-share curve has the largest area on the held-out records.",
    )
    top_logprobs: int = Field(
        5, ge=0, le=20,
        description="Top-k logprobs per token the entropy signals use (what the student endpoint is asked for); "
        "0 leaves entropy out.",
    )
    length_quantile: float = Field(
        1.0, gt=0, le=1, description="Inputs longer than this quantile of trained input lengths go to the teacher."
    )
    length_count: Literal["estimate", "bounded", "exact"] = Field(
        "estimate",
        description="How the Router counts input tokens (system prompts are always tokenized once and cached). "
        "'exact': every message tokenized (about 20 us each); 'bounded': predicted from bytes and spaces with "
        "the error range seen in training, tokenized only when that range straddles the limit (same decisions as "
        "exact on text like the training inputs); 'estimate': as bounded, but takes the prediction instead of "
        "tokenizing (a token or two off near the limit; the fit replays it, so the calibration includes it).",
    )
    min_records: int = Field(
        5, gt=0, le=MAX_COUNT, description="A function with fewer held-out records than this is never sent to the student."
    )
    language: LanguageRule = Field(default_factory=LanguageRule)
    distance: DistanceRule = Field(default_factory=DistanceRule)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    # exclude=True keeps it out of model_dump, so out of the route stage's fingerprint: the live loop's settings
    # change nothing the stage writes, and changing them must not refit and republish the student.
    live: LiveConfig = Field(default_factory=LiveConfig, exclude=True,
                             description="The live loop: audits, shadow, canary, promotion, rollback (docs/live.md).")

    @model_validator(mode="after")
    def _entropy_needs_top_logprobs(self) -> RouteConfig:
        if self.signal in ("mean_entropy", "max_entropy") and self.top_logprobs == 0:
            raise ValueError(f"signal '{self.signal}' needs route.top_logprobs > 0")
        return self
