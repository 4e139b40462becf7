"""Analysis tools for finished (or running) DHM experiments.

* `curves`: training / validation top-1 curves from TensorBoard logs (supplement
  Fig. 1-2), several seeds per run drawn as a mean with a band.
* `correlation`: kernel-correlation heatmaps between corresponding conv layers of a
  side branch and the main branch (supplement Appendix H, Fig. 3).
* `gradient_consistency`: cosine similarity between the gradients of each auxiliary
  head's loss and the main head's loss on the shared backbone (Appendix C), as a
  Keras callback.
* `report` tabulates results.json files over seeds.

Submodules are imported on demand: `gradient_consistency` is light (TensorFlow and
Keras only) and may be used by the training loop, while the others pull in matplotlib.
"""
