"""The Serve application builder: `import_path: mmfusion.serving.app:build_app` in serve/*.yaml.

    serve run serve/local.yaml                         # or: mmfusion serve ARTIFACT (fills args.artifact)
    serve run mmfusion.serving.app:build_app artifact=/abs/path/to/artifact topology=single

Serve validates the config's `args:` against `ServeArgs` (this module keeps real annotations, no
`from __future__ import annotations`, so Serve sees the pydantic class and unknown keys fail).
"""

import logging

from ray.serve import Application

from mmfusion.serving.schemas import ServeArgs

log = logging.getLogger(__name__)

INGRESS = "Ingress"
FUSION = "Fusion"
MODEL = "Model"
MONOLITH = "Monolith"  # the monolith topology's one deployment: the Ingress class with the model inside
TOPOLOGIES = ("split", "single", "monolith")


def encoder_name(modality: str) -> str:
    """The deployment name of a modality's encoder: image -> ImageEncoder (the key in serve/*.yaml)."""
    return f"{modality.capitalize()}Encoder"


def deployment_names(modalities: list[str], topology: str) -> list[str]:
    """The deployments `build_app` creates for a model with these modalities, ingress first."""
    if topology == "single":
        return [INGRESS, MODEL]
    if topology == "monolith":
        return [MONOLITH]
    return [INGRESS, *(encoder_name(m) for m in modalities), FUSION]


def build_app(args: ServeArgs) -> Application:
    """Ingress -> one encoder deployment per modality of the artifact -> fusion (split), ingress -> model
    (single), or the ingress with the model inside it, deployed as Monolith (monolith).

    The artifact's config is read here, so a wrong path or a broken artifact fails the deployment at once with
    a message naming it, instead of in every replica.
    """
    from mmfusion.artifact import read_artifact_info
    from mmfusion.serving.deployments import Ingress
    from mmfusion.serving.replicas import Encoder, Fusion, Model

    if not isinstance(args, ServeArgs):  # a plain dict when called from Python code
        args = ServeArgs.model_validate(args)
    info = read_artifact_info(args.artifact)
    common = {"device": args.device, "torch_threads": args.torch_threads}
    log.info("building the %s app for %s (%s)", args.topology, info.path, ", ".join(info.modalities))
    if args.topology == "monolith":
        return Ingress.options(name=MONOLITH).bind(args)
    if args.topology == "single":
        return Ingress.options(name=INGRESS).bind(
            args, model=Model.options(name=MODEL).bind(args.artifact, **common))
    encoders = {m: Encoder.options(name=encoder_name(m)).bind(args.artifact, m, **common)
                for m in info.modalities}
    fusion = Fusion.options(name=FUSION).bind(args.artifact, **common)
    return Ingress.options(name=INGRESS).bind(args, encoders=encoders, fusion=fusion)
