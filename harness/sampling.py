"""Run ComfyUI's real sampling code paths on a model: SamplerCustomAdvanced and KSampler."""
from .comfy_host import boot
from .executor import in_executor, run_node


def sigmas_for(patcher, steps: int, scheduler: str = "normal"):
    boot()
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps).cpu()


def sample_guider(guider, latent: dict, *, steps: int = 20, sampler: str = "euler", scheduler: str = "normal",
                  seed: int = 0, sigmas=None):
    """Denoise ``latent`` with ``guider`` through the stock SamplerCustomAdvanced node (on ``sigmas`` when given,
    else the scheduler's); returns samples."""
    boot()
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    sigmas = sigmas_for(guider.model_patcher, steps, scheduler) if sigmas is None else sigmas
    output = run_node(SamplerCustomAdvanced, Noise_RandomNoise(seed), guider, comfy.samplers.sampler_object(sampler),
                      sigmas, latent)
    return output[0]["samples"]


def cfg_guider(patcher, positive, negative, cfg: float):
    """ComfyUI's stock CFGGuider (the pack's own helper, so tests and benchmarks build it one way)."""
    boot()
    from guidance_kit.nodes.contract.guiders import cfg_guider as stock_cfg_guider

    return stock_cfg_guider(patcher, positive, negative, cfg)


def switched_cfg_guider(patcher, positive, negative, cfg: float, guided):
    """ComfyUI's own sampling_function at scale ``cfg`` where ``guided(sigma, sample_sigmas)`` holds and at
    scale 1 elsewhere: the reference for "CFG, then conditional only" (the tests' AG reference, the
    benchmarks' fixed-window peer)."""
    boot()
    import comfy.samplers

    class SwitchedCFGGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI signature)
            sigmas = model_options["transformer_options"]["sample_sigmas"]
            scale = self.cfg if guided(float(timestep.flatten()[0]), sigmas) else 1.0
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), scale, model_options=model_options,
                                                    seed=seed)

    guider = SwitchedCFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def ksample(patcher, positive, negative, latent: dict, *, cfg: float, steps: int = 20, sampler: str = "euler",
            scheduler: str = "normal", seed: int = 0):
    """Denoise through the stock KSampler node's code path (in the executor's context); returns samples."""
    boot()
    import nodes

    output = in_executor(nodes.common_ksampler, patcher, seed, steps, cfg, sampler, scheduler, positive, negative,
                         latent)
    return output[0]["samples"]
