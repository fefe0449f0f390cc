"""rftlib: a workbench for robust fine-tuning of zero-shot vision-language models (CLIP).

The library holds every computation; the notebooks in ``notebooks/`` are thin narratives over it.

Entry points:
    * :func:`rftlib.models.load_clip`, :func:`rftlib.models.build_zeroshot_head`,
      :class:`rftlib.models.ImageClassifier`, :func:`rftlib.models.save_checkpoint`
    * :func:`rftlib.data.get_dataset`, :func:`rftlib.data.list_datasets`
    * :func:`rftlib.evaluate.evaluate`, :mod:`rftlib.metrics`
    * :mod:`rftlib.results` (the SQLite results store)
"""

__version__ = "0.1.0"
