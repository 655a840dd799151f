"""Transfer-learning image classifier: a batch job from labelled image folders to a SavedModel."""
import logging
import sys


def configure_logging() -> None:
    """Timestamped lines on stderr: this project's loggers ("job", "export") from INFO, libraries
    from WARNING (onnxruntime's quantizer, for one, logs a line per dead channel at INFO)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for own in ("job", "export"):
        logging.getLogger(own).setLevel(logging.INFO)
