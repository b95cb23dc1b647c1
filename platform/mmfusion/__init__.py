"""mmfusion: multimodal (image + text + audio) fusion classifiers, trained, tuned and served on Ray.

Importing this package is cheap: it imports neither Ray nor torch. Submodules import them where used.
"""

__version__ = "0.1.0"
