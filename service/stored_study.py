"""The study as the database keeps it: the JSON of the study row's ``spec`` column, typed.

``POST /studies`` stores the whole validated study (``ValidatedStudy`` as JSON) with its
``spec`` key holding the spec as the user wrote it (:func:`StoredStudy.blob`). A row may
also hold a bare study spec (rows written by tests and tools, and by earlier versions).
:meth:`StoredStudy.load` reads either form, and never fails on a malformed blob: what it
cannot read is left empty. The database format itself is unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from search_spaces.sources import StudyRef

if TYPE_CHECKING:
    from service.db.models import Study
    from service.validation import ValidatedStudy


class StoredModel(BaseModel):
    """A model of the stored study, as validation resolved it (``ResolvedModel``'s names)."""

    model_config = ConfigDict(extra="ignore")
    ref: str | None = Field(default=None, description="how recipes and workers name it")
    given: str | None = Field(default=None, description="as the spec wrote it")
    path: str | None = Field(default=None, description="the local folder read, if any")


class StoredStudy(BaseModel):
    """The parts of a stored study that the service reads back."""

    spec: dict[str, Any] = Field(description="the study spec as submitted")
    warnings: list[Any] = Field(default_factory=list, description="accepted at submission, but worth a look")
    memory_plan: dict[str, Any] | None = None
    models: list[StoredModel] = Field(default_factory=list)
    space_spec: dict[str, Any] = Field(default_factory=dict, description="the full space spec")
    study_refs: list[Any] | None = Field(
        default=None, description="as stored: other studies' models (None: a bare spec, whose sources say)")

    @classmethod
    def load(cls, blob: Any) -> StoredStudy:
        """Read a ``Study.spec`` value (either form; anything else reads as an empty spec)."""
        data = blob if isinstance(blob, dict) else {}
        return cls.model_construct(  # every value's type is checked here: no copies of the spec
            spec=data["spec"] if isinstance(data.get("spec"), dict) else data,
            warnings=list(data.get("warnings") or []),
            memory_plan=data["memory_plan"] if isinstance(data.get("memory_plan"), dict) else None,
            models=[_stored_model(m) for m in data.get("models") or [] if isinstance(m, dict)],
            space_spec=data["space_spec"] if isinstance(data.get("space_spec"), dict) else {},
            study_refs=list(data.get("study_refs") or []) if "study_refs" in data else None,
        )

    @classmethod
    def from_row(cls, study: Study) -> StoredStudy:
        """The stored study of a study row."""
        return cls.load(study.spec)

    @staticmethod
    def blob(validated: ValidatedStudy) -> dict[str, Any]:
        """What ``POST /studies`` stores for a validated study: all of it, with the spec as the
        user wrote it (a default written out, such as optimizer.seed, would read as the user's
        own when the controller validates the stored spec again)."""
        stored = validated.model_dump(mode="json")
        stored["spec"] = validated.spec.model_dump(mode="json", exclude_unset=True)
        return stored

    def refs(self) -> list[StudyRef]:
        """The other studies' models this study builds on (a bare spec: those its sources name)."""
        if self.study_refs is not None:  # the validated form the API stores
            return [StudyRef.model_validate(r) for r in self.study_refs]
        named = [*(self.spec.get("sources") or []), self.spec.get("base_model")]
        refs = [StudyRef.model_validate(r) for r in named if isinstance(r, dict) and "study" in r]
        return list(dict.fromkeys(refs))

    def model_names(self) -> dict[str, str]:
        """How recipes name each model -> how the spec wrote it."""
        return {m.ref: m.given for m in self.models if m.ref is not None and m.given is not None}


def _stored_model(entry: dict[str, Any]) -> StoredModel:
    return StoredModel(**{k: v for k in ("ref", "given", "path") if isinstance(v := entry.get(k), str)})
