"""Sentence embeddings for the drift monitor, computed locally with sentence-transformers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from monitor.errors import ConfigError, DataError


class Embedder:
    """Sentence encoder that returns L2-normalised float32 embeddings.

    Parameters
    ----------
    model_path : str
        Local directory of a sentence-transformers model, or of a plain Hugging Face
        encoder, for which sentence-transformers adds mean pooling. Nothing is
        downloaded: the model is loaded with ``local_files_only=True``.
    device : str
        Torch device, for example ``"cpu"`` or ``"cuda"``.
    batch_size : int
        Number of texts per forward pass.
    """

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 64):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        path = Path(model_path)
        if not path.is_dir():
            raise DataError(f"embedding model directory not found: {path}")

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        try:
            self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except (OSError, ValueError) as error:
            raise DataError(f"failed to load embedding model from {path}: {error}") from error

        self.model_path = str(path)
        self.device = device
        self.batch_size = batch_size
        self._dimension = int(self._model.get_embedding_dimension())

    @property
    def dimension(self) -> int:
        """Length of each embedding vector."""
        return self._dimension

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts`` into a float32 array of shape ``(len(texts), dimension)``.

        Each row has unit L2 norm, unless the model outputs an all-zero vector, which
        stays zero. An empty list returns an array of shape ``(0, dimension)``.
        """
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"texts[{index}] must be a str, got {type(text).__name__}")
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)

        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1.0)
