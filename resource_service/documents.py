"""The reference resource service's data: a tiny, fixed, in-memory set of documents."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

from authmesh._shared.errors import NotFound


@dataclass(frozen=True, slots=True)
class Document:
    """One document.

    Attributes:
        id: Its identifier.
        owner: Who wrote it.
        body: Its text.
    """

    id: str
    owner: str
    body: str


class DocumentNotFound(NotFound):
    """No document has the requested id."""

    code = "DOCUMENT_NOT_FOUND"
    default_message = "document not found"


class DocumentStore:
    """Read-only documents by id.

    Args:
        documents: The documents to serve.
    """

    def __init__(self, documents: Iterable[Document]) -> None:
        self._documents = MappingProxyType({document.id: document for document in documents})

    def get(self, document_id: str) -> Document:
        """The document with ``document_id``.

        Raises:
            DocumentNotFound: There is none.
        """
        document = self._documents.get(document_id)
        if document is None:
            raise DocumentNotFound()
        return document

    def __len__(self) -> int:
        return len(self._documents)


def sample_documents() -> DocumentStore:
    """The documents every replica serves."""
    return DocumentStore(
        (
            Document("welcome", "authmesh", "Every call to this service is verified locally."),
            Document(
                "revocation", "authmesh", "A revoked token is refused by every replica within milliseconds."
            ),
            Document(
                "keys", "authmesh", "Public keys come from the auth service; private keys never leave it."
            ),
        )
    )
