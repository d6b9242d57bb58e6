"""The named errors of the path from a trained run to visual search (export, embed, index,
search): each says which file, run or image is at fault. All are ValueError or
FileNotFoundError/FileExistsError subclasses, so the command lines report them the same way."""

from __future__ import annotations


class CheckpointError(FileNotFoundError):
    """A checkpoint folder that is missing, partial (no meta.json or no model state) or unreadable."""


class UnknownRunError(LookupError):
    """An MLflow run id or model URI the tracking store does not know."""


class ImageDecodeError(ValueError):
    """An input image that does not decode; the message names the file."""


class ImageTooSmallError(ValueError):
    """An input image too small or too elongated to mean anything (fgdist/images.py
    `check_shape`); the message names the file and its size."""


class OutputExistsError(FileExistsError):
    """The output folder exists and --overwrite was not given."""


class NotFgdistOutputError(OutputExistsError):
    """The output exists and fgdist did not write it (no marker, files added, a file or a link):
    never replaced, --overwrite or not (fgdist/output_folder.py)."""


class OutputIsInputError(ValueError):
    """The output is, contains or lies inside one of the command's inputs; the message names both."""


class DimensionMismatchError(ValueError):
    """Embeddings whose dimension differs from the index's (another model, or another width)."""


class IndexFolderError(FileNotFoundError):
    """An fgdist-index folder that is missing, partial or unreadable (its index.json, index.faiss
    or rows.parquet); the message names the file."""


class UnlabelledQueriesError(ValueError):
    """Retrieval metrics asked of queries (or a gallery) without labels: there is nothing to score."""


ERRORS = (
    CheckpointError,
    UnknownRunError,
    ImageDecodeError,
    ImageTooSmallError,
    OutputExistsError,
    OutputIsInputError,
    DimensionMismatchError,
    IndexFolderError,
    UnlabelledQueriesError,
)
