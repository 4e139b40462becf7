"""Analysis tools for finished (or running) DHM experiments.

* `curves`: training / validation top-1 curves from TensorBoard logs (supplement
  Fig. 1-2), several seeds per run drawn as a mean with a band.
* `correlation`: kernel-correlation heatmaps between corresponding conv layers of a
  side branch and the main branch (supplement Appendix H, Fig. 3).
* `report` tabulates results.json files over seeds.

Submodules are imported on demand (some pull in matplotlib). The gradient-consistency
measurement of Appendix C runs during training, so it lives with the trainer
(`dhm_keras.gradient_consistency`), not here: the trainer imports nothing from this
package.
"""
