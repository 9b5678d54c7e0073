"""The AUTOMATIC1111 web UI API dialect (`/sdapi/v1/...`, as its `modules/api/api.py` serves it):
requests -> GenerationJob, results, errors, lists, options and progress -> A1111's replies.
Nothing here queues or logs; authentication is the server's (A1111's clients send HTTP Basic
credentials: any user name, the API token as the password; Bearer works too).

    POST /sdapi/v1/txt2img, /sdapi/v1/img2img   -> {"images": [base64 PNG], "parameters": {...}, "info": "<JSON>"}
    GET  /sdapi/v1/samplers, /schedulers          the names served (sd/serve/a1111_names.py)
    GET  /sdapi/v1/sd-models                      the models whose weights are here
    GET  /sdapi/v1/options, POST /sdapi/v1/options   sd_model_checkpoint (the default model) and
                                                  CLIP_stop_at_last_layers; the rest is fixed
    GET  /sdapi/v1/progress                       the running job: progress 0-1, eta, state, preview
    POST /sdapi/v1/interrupt                      stops the running A1111 job at its next checkpoint
    GET  /sdapi/v1/scripts                        none (webuiapi asks when it starts)

Fields are A1111's StableDiffusionProcessingTxt2Img / Img2Img API models, each type-checked
strictly (`true` is not a number, `20.0` not an integer; `null` only where A1111's default is
null). Unknown fields are ignored, as A1111's pydantic models ignore them (clients send other
servers' fields: SillyTavern's `clip_skip` for SD.Next, `hr_additional_modules` for Forge), but a
name within a typo of a known one (`step`, `negative_prompts`) is an error, since it would
silently fall back to a default. Every field is either used, accepted and ignored because it
changes nothing a client sees (saving to the server's disk, task ids, hires settings while
`enable_hr` is false), or refused with a 400 when set to anything but its default because sd does
not do it (hires fix, refiner, face restoration, tiling, styles, scripts, variation seeds, ...).
Omitted settings take the served model's defaults (size, steps, CFG, sampler), not A1111's fixed
512x512, 50 steps, CFG 7 and Euler; the prompt is always read with A1111's emphasis syntax
(prompt_style="weighted"), and A1111's other prompt syntax sd does not implement (prompt editing
`[a:b:0.5]`, alternation `[a|b]`, `AND`, extra networks `<lora:...>`) is refused, not read as text.

`batch_size` x `n_iter` images are made as one batch (at most MAX_IMAGES) with seeds seed ..
seed + N - 1: the seeds A1111 gives the same request. Masks: white repaints (as sd and A1111),
`inpainting_mask_invert` flips them, a mask with transparency uses its alpha channel as A1111 does,
`mask_blur` blurs it (A1111's Gaussian) before sd thresholds it at 0.5, and the original is pasted
back outside the mask (sd's 3-pixel soft edge, where A1111 uses the blurred mask);
`inpainting_fill` 0 ("fill") or 1 ("original"); "only masked" (`inpaint_full_res`) is refused.

An interrupted job answers as A1111's does: 200 with its pictures decoded from the last step's
prediction of the clean latents (no pictures if no step had finished).

Errors are A1111's envelope `{"error": ..., "detail": ..., "body": "", "errors": ...}` (its
api_middleware's), with the server's statuses (400 bad input, 401, 404, 413, 422 too slow, 429,
503, 504; the full table in sd/serve/workers_ai.py); the detail names each field and rule.
"""

import base64
import difflib
import io
import json
import random
import re
import threading
import time
import weakref

from ..errors import lone_surrogate
from ..registry import DEFAULT_MODEL, REGISTRY
from . import a1111_names as names
from .jobs import GenerationJob, GenerationResult, Reply, RequestError
from .workers_ai import base64_bytes, image_size, parse_json, shown

JSON = "application/json"
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_STEPS = 150                 # A1111's UI limit
MAX_IMAGES = 16                 # batch_size x n_iter, made as one batch
MAX_CFG = 100
MAX_BLUR = 64
MAX_SEED = 2 ** 64 - 1
RANDOM_SEEDS = 4294967294       # A1111 draws seed -1 from range(this)
MAX_CLIP_SKIP = 12

# ---------------------------------------------------------------- the schema

# name -> (kind, A1111's default). `null` is allowed where the default is None.
COMMON = {
    "prompt": ("str", ""), "negative_prompt": ("str", ""), "styles": ("list", None), "seed": ("int", -1),
    "subseed": ("int", -1), "subseed_strength": ("number", 0), "seed_resize_from_h": ("int", -1),
    "seed_resize_from_w": ("int", -1), "seed_enable_extras": ("bool", True), "sampler_name": ("str", None),
    "scheduler": ("str", None), "batch_size": ("int", 1), "n_iter": ("int", 1), "steps": ("int", 50),
    "cfg_scale": ("number", 7.0), "width": ("int", 512), "height": ("int", 512), "restore_faces": ("bool", None),
    "tiling": ("bool", None), "do_not_save_samples": ("bool", False), "do_not_save_grid": ("bool", False),
    "eta": ("number", None), "denoising_strength": ("number", 0.75), "s_min_uncond": ("number", None),
    "s_churn": ("number", None), "s_tmax": ("number", None), "s_tmin": ("number", None), "s_noise": ("number", None),
    "override_settings": ("dict", None), "override_settings_restore_afterwards": ("bool", True),
    "refiner_checkpoint": ("str", None), "refiner_switch_at": ("number", None),
    "disable_extra_networks": ("bool", False), "comments": ("dict", None), "sampler_index": ("str", "Euler"),
    "script_name": ("str", None), "script_args": ("list", []), "send_images": ("bool", True),
    "save_images": ("bool", False), "alwayson_scripts": ("dict", {}), "force_task_id": ("str", None),
    "infotext": ("str", None),
}
TXT2IMG = {
    **COMMON, "enable_hr": ("bool", False), "firstphase_width": ("int", 0), "firstphase_height": ("int", 0),
    "hr_scale": ("number", 2.0), "hr_upscaler": ("str", None), "hr_second_pass_steps": ("int", 0),
    "hr_resize_x": ("int", 0), "hr_resize_y": ("int", 0), "hr_checkpoint_name": ("str", None),
    "hr_sampler_name": ("str", None), "hr_scheduler": ("str", None), "hr_prompt": ("str", ""),
    "hr_negative_prompt": ("str", ""), "firstpass_image": ("str", None),
}
IMG2IMG = {
    **COMMON, "init_images": ("list", None), "resize_mode": ("int", 0), "image_cfg_scale": ("number", None),
    "mask": ("str", None), "mask_blur_x": ("int", 4), "mask_blur_y": ("int", 4), "mask_blur": ("int", None),
    "mask_round": ("bool", True), "inpainting_fill": ("int", 0), "inpaint_full_res": ("bool", True),
    "inpaint_full_res_padding": ("int", 0), "inpainting_mask_invert": ("int", 0),
    "initial_noise_multiplier": ("number", None), "latent_mask": ("str", None), "include_init_images": ("bool", False),
}
RANGES = {
    "seed": (-1, MAX_SEED), "batch_size": (1, MAX_IMAGES), "n_iter": (1, MAX_IMAGES), "steps": (1, MAX_STEPS),
    "cfg_scale": (0, MAX_CFG), "width": (MIN_SIDE, MAX_SIDE), "height": (MIN_SIDE, MAX_SIDE),
    "denoising_strength": (0, 1), "eta": (0, 1), "s_churn": (0, 100), "s_tmin": (0, 10), "s_tmax": (0, 999),
    "s_noise": (0, 1.1), "mask_blur": (0, MAX_BLUR), "mask_blur_x": (0, MAX_BLUR), "mask_blur_y": (0, MAX_BLUR),
    "inpainting_mask_invert": (0, 1), "inpainting_fill": (0, 3), "resize_mode": (0, 3),
}
KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: type(v) is int, "an integer"),     # bool is an int to Python, and JSON true is not a number
    "number": (lambda v: type(v) in (int, float), "a number"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "list": (lambda v: isinstance(v, list), "an array"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
}
# What sd does not do, refused unless the field holds a value meaning "off": field -> (is off, why).
NOT_SERVED = {
    "enable_hr": (lambda v: not v, "hires fix is not served (sd makes the picture at width x height in one pass)"),
    "firstphase_width": (lambda v: not v, "the old hires fix's first pass is not served"),
    "firstphase_height": (lambda v: not v, "the old hires fix's first pass is not served"),
    "firstpass_image": (lambda v: v is None, "hires fix from a first-pass picture is not served"),
    "restore_faces": (lambda v: not v, "face restoration is not served"),
    "tiling": (lambda v: not v, "tiling (seamless textures) is not served"),
    "styles": (lambda v: not v, "the server has no saved prompt styles"),
    "subseed_strength": (lambda v: v == 0, "variation seeds are not served"),
    "seed_resize_from_h": (lambda v: v <= 0, "seed resizing is not served"),
    "seed_resize_from_w": (lambda v: v <= 0, "seed resizing is not served"),
    "script_name": (lambda v: not v, "scripts are not served"),
    "alwayson_scripts": (lambda v: not v, "scripts (ControlNet, ADetailer, ...) are not served"),
    "refiner_checkpoint": (lambda v: v in (None, "", "None", "none"), "a refiner is not served"),
    "s_min_uncond": (lambda v: not v, "skipping the negative prompt at low noise (NGMS) is not served"),
    "infotext": (lambda v: not v, "settings from an infotext are not read; send the fields"),
    "resize_mode": (lambda v: v == 0, "only 0 (just resize) is served"),
    "inpainting_fill": (lambda v: v in (0, 1), "only 0 (fill) and 1 (original) are served"),
    "mask_round": (lambda v: v, "sd always rounds the mask (thresholds it at 0.5)"),
    "initial_noise_multiplier": (lambda v: v in (None, 1), "only 1 is served"),
    "latent_mask": (lambda v: v is None, "a separate latent mask is not served"),
}
# The options /sdapi/v1/options shows besides the two a client may set; their values are sd's fixed ones.
FIXED_OPTIONS = {"sd_vae": "Automatic", "samples_format": "png", "enable_pnginfo": True, "eta_ancestral": 1.0,
                 "eta_ddim": 0.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
OVERRIDES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", *FIXED_OPTIONS)
SAMPLER_EXTRAS = ("s_churn", "s_tmin", "s_tmax", "s_noise")  # A1111 passes these to Euler, Heun and DPM2 only
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")                  # A1111's <lora:name:weight> and kin
AND = re.compile(r"\bAND\b")
INNER_BRACKETS = re.compile(r"(?<!\\)\[((?:[^\[\]\\]|\\.)*)(?<!\\)\]")
SCHEDULED = re.compile(r".*:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*", re.S)  # [from:to:when], [to:when]


def error_reply(status: int, messages: list[str], headers: dict | None = None) -> Reply:
    """A1111's error envelope (its api_middleware's handle_exception)."""
    detail = "; ".join(messages)
    body = {"error": "HTTPException", "detail": detail, "body": "", "errors": f"{status}: {detail}"}
    return Reply(status, json.dumps(body).encode(), JSON, dict(headers or {}))


def _json(value, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value).encode(), JSON)


def model_title(model: str) -> str:
    """An A1111 checkpoint title: the model id itself (A1111 writes "file.safetensors [hash]")."""
    return model


def model_of(name: str) -> str | None:
    """A checkpoint name -> a served model id: the id, or its last part (A1111's model_name)."""
    return name if name in REGISTRY else next((m for m in REGISTRY if m.rsplit("/", 1)[-1] == name), None)


# ---------------------------------------------------------------- the server's state


class ServerState:
    """One server's A1111 state: its options (the default checkpoint, clip skip) and its A1111
    requests in flight, which /interrupt may stop; kept on the app, made on first use."""

    def __init__(self, service):
        self.service = service
        self.lock = threading.Lock()
        self.checkpoint = DEFAULT_MODEL
        self.clip_skip = 1                          # A1111's count: 1 is the last layer
        self.requests: weakref.WeakValueDictionary[int, Generation] = weakref.WeakValueDictionary()
        service.worker.listeners.append(self.changed)

    def options(self) -> dict:
        with self.lock:
            return {"sd_model_checkpoint": model_title(self.checkpoint), "CLIP_stop_at_last_layers": self.clip_skip,
                    **FIXED_OPTIONS}

    def set_options(self, data) -> None:
        """POST /sdapi/v1/options: the whole dict GET gave back (Open WebUI sends that) or a part of it."""
        if not isinstance(data, dict):
            raise RequestError(400, f"body: must be a JSON object of options, got {shown(data)}")
        errors, updates = [], {}
        for key, value in data.items():
            try:
                updates[key] = check_option(key, value)
            except RequestError as e:
                errors.extend(e.messages)
        if errors:
            raise RequestError(400, errors)
        with self.lock:
            self.checkpoint = updates.get("sd_model_checkpoint", self.checkpoint)
            self.clip_skip = updates.get("CLIP_stop_at_last_layers", self.clip_skip)

    def pipeline(self, ticket):
        """The ticket's model as its own worker (device) holds it; loaded, since the job runs."""
        cache = ticket.worker.cache if getattr(ticket, "worker", None) is not None else self.service.cache
        return cache.pipelines.get(ticket.job.model)

    def request_of(self, job):
        with self.lock:
            found = self.requests.get(id(job))
        return found if found is not None and found.job is job else None

    def changed(self, ticket):
        """Worker listener (its thread): an A1111 job stopped by /interrupt gets A1111's answer,
        its pictures decoded from the last step's prediction of the clean latents."""
        if ticket.state != "stopped" or (request := self.request_of(ticket.job)) is None or not request.interrupted:
            return
        try:
            result = partial_result(self.pipeline(ticket), ticket)
        except Exception as e:  # handed to the request, which answers 500 and logs it
            result = e
        loop = ticket.future.get_loop()
        loop.call_soon_threadsafe(_settle, ticket.future, result)


def _settle(future, result):
    if not future.done():
        (future.set_exception if isinstance(result, Exception) else future.set_result)(result)


def partial_result(pipe, ticket) -> GenerationResult:
    import torch
    from .worker import encode
    pictures = []
    if ticket.denoised is not None and pipe is not None:
        kwargs = ticket.job.kwargs
        d = pipe.defaults
        seed, n = kwargs.get("seed", 0), ticket.denoised.shape[0]
        settings = dict(prompt=kwargs.get("prompt"), negative_prompt=kwargs.get("negative_prompt"),
                        width=kwargs.get("width", d.width), height=kwargs.get("height", d.height),
                        num_steps=kwargs.get("num_steps", d.num_steps), guidance=kwargs.get("guidance", d.guidance),
                        sampler=kwargs.get("sampler", d.sampler), schedule=kwargs.get("schedule") or d.schedule,
                        interrupted_after_step=ticket.step)
        with torch.inference_mode():
            images = pipe.decode(ticket.denoised)
        for k, image in enumerate(images[:n]):
            image.info["sd"] = {**settings, "seed": seed + k}
            pictures.append(encode(image, ticket.job.model))
    return GenerationResult(pictures, time.time() - (ticket.started or time.time()))


_STATE_LOCK = threading.Lock()


def state_of(app) -> ServerState:
    with _STATE_LOCK:
        state = getattr(app.state, "a1111", None)
        if state is None:
            state = app.state.a1111 = ServerState(app.state.service)
        return state


def check_option(key: str, value):
    if key == "sd_model_checkpoint":
        model = model_of(value) if isinstance(value, str) else None
        if model is None:
            raise RequestError(400, f"sd_model_checkpoint: {shown(value)} is not one of the served models "
                                    f"({', '.join(map(model_title, REGISTRY))})")
        return model
    if key == "CLIP_stop_at_last_layers":
        if type(value) is not int or not 1 <= value <= MAX_CLIP_SKIP:
            raise RequestError(400, f"CLIP_stop_at_last_layers: must be an integer in [1, {MAX_CLIP_SKIP}], "
                                    f"got {shown(value)}")
        return value
    if key in FIXED_OPTIONS:
        if key == "sd_vae" and value == "None":  # A1111's "the checkpoint's own VAE": what sd always uses
            return value
        if value != FIXED_OPTIONS[key] or type(value) is not type(FIXED_OPTIONS[key]):
            raise RequestError(400, f"{key}: sd serves it fixed at {json.dumps(FIXED_OPTIONS[key])}, "
                                    f"got {shown(value)}")
        return value
    raise RequestError(400, f"{key}: not an option sd serves (options: {', '.join(OVERRIDES)})")


# ---------------------------------------------------------------- txt2img / img2img


class Generation:
    """One txt2img or img2img request: `to_job` reads it, `image_reply` / `error_reply` answer
    it (app.generation calls them); kept while it runs so that /interrupt can find its job."""
    basic_auth = True

    def __init__(self, mode: str, state: ServerState):
        self.mode, self.state = mode, state
        self.fields = TXT2IMG if mode == "txt2img" else IMG2IMG
        self.job = None
        self.interrupted = False
        self.started = time.time()

    def to_job(self, model: str | None, body: bytes, content_type: str = JSON) -> GenerationJob:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise RequestError(400, f"body: must be a JSON object, got {shown(data)}")
        errors: list[str] = []
        values = self._checked(data, errors)
        if errors:
            raise RequestError(400, errors)
        self.values, self.given = values, {k: v for k, v in data.items() if k in self.fields}
        kwargs = self._kwargs(values, errors)
        if errors:
            raise RequestError(400, errors)
        model = self._model(values, errors)
        if errors:
            raise RequestError(400, errors)
        self.job = GenerationJob(model, kwargs)
        with self.state.lock:  # to_job may run in a parsing thread
            self.state.requests[id(self.job)] = self
        return self.job

    def _checked(self, data: dict, errors: list[str]) -> dict:
        """Every known field's value (the default where omitted or null), type- and range-checked."""
        values = {}
        for name in data:
            if name not in self.fields and (close := _near_miss(name, self.fields)):
                errors.append(f"{shown(name)[1:-1]}: not a field of {self.mode} (did you mean {close}?)")
        for name, (kind, default) in self.fields.items():
            value = data.get(name, default)
            if value is None:
                if name in data and default is not None:
                    errors.append(f"{name}: must be {KINDS[kind][1]}, got null")
                values[name] = default
                continue
            test, what = KINDS[kind]
            lo, hi = RANGES.get(name, (None, None))
            if not test(value) or (lo is not None and not lo <= value <= hi):
                rule = f"{what} in [{lo}, {hi}]" if lo is not None else what
                errors.append(f"{name}: must be {rule}, got {shown(value)}")
                continue
            if kind == "str" and lone_surrogate(value) is not None:
                errors.append(f"{name}: must be valid Unicode text (it holds a lone surrogate)")
                continue
            off, why = NOT_SERVED.get(name, (None, None))
            if off is not None and not off(value):
                errors.append(f"{name}: {why}; got {shown(value)}")
                continue
            values[name] = value
        if values.get("batch_size", 1) * values.get("n_iter", 1) > MAX_IMAGES:
            errors.append(f"batch_size x n_iter: at most {MAX_IMAGES} images a request, got "
                          f"{values['batch_size']} x {values['n_iter']}")
        return values

    def _kwargs(self, v: dict, errors: list[str]) -> dict:
        """The checked fields -> Pipeline.generate's keyword arguments (omitted ones: the model's defaults)."""
        given = self.given
        kwargs = {"prompt": v["prompt"], "negative_prompt": v["negative_prompt"], "prompt_style": "weighted"}
        for name in ("prompt", "negative_prompt"):
            errors.extend(prompt_problems(name, v[name]))
        n = v["batch_size"] * v["n_iter"]
        if n > 1:
            kwargs["num_images"] = n
        kwargs["seed"] = random.randrange(RANDOM_SEEDS) if v["seed"] == -1 else v["seed"]
        if v["seed"] + n - 1 > MAX_SEED:
            errors.append(f"seed: the batch's seeds seed .. seed + {n - 1} must stay within {MAX_SEED}")
        for name, kw in (("width", "width"), ("height", "height"), ("steps", "num_steps"), ("cfg_scale", "guidance")):
            if name in given:
                kwargs[kw] = v[name]
        named = "sampler_name" in given or "sampler_index" in given  # neither: the model's own sampler
        try:
            self.choice = names.choose(v["sampler_name"] or v["sampler_index"] if named else None, v["scheduler"],
                                       "sampler_name" if v["sampler_name"] else "sampler_index")
        except ValueError as e:
            errors.append(str(e))
            return kwargs
        if self.choice.sampler:
            kwargs["sampler"] = self.choice.sampler
        if self.choice.schedule:
            kwargs["schedule"] = self.choice.schedule
        options = {**self.choice.options, **self._sampler_extras(v, errors)}
        if options:
            kwargs["sampler_options"] = options
        overrides = v["override_settings"] or {}
        for key, value in overrides.items():
            try:
                check_option(key, value)
            except RequestError as e:
                errors.extend(f"override_settings.{m}" for m in e.messages)
        with self.state.lock:
            clip_skip = overrides.get("CLIP_stop_at_last_layers", self.state.clip_skip)
        if isinstance(clip_skip, int) and clip_skip > 1:
            kwargs["clip_skip"] = clip_skip - 1  # A1111 counts the last layer as 1, sd as 0
        if self.mode == "img2img":
            kwargs.update(self._pictures(v, errors))
        return kwargs

    def _sampler_extras(self, v: dict, errors: list[str]) -> dict:
        """eta for the samplers that take one; s_churn & co. for Euler, Heun and DPM2, as A1111
        passes them (its s_tmax 0 means no bound); values equal to sd's defaults are left out."""
        from ..samplers import SAMPLERS
        sampler = self.choice.sampler
        if sampler is None:
            return {}
        takes = SAMPLERS[sampler].fn.__kwdefaults__ or {}
        out = {}
        if v["eta"] is not None:
            if "eta" in takes:
                out["eta"] = float(v["eta"])
            elif sampler == "ddim" and v["eta"] != 0:
                errors.append(f"eta: sd's DDIM is deterministic (eta 0 only), got {shown(v['eta'])}")
        if sampler in ("euler", "heun", "dpm_2"):
            out.update({name: float(v[name]) for name in SAMPLER_EXTRAS if v[name] is not None})
            if out.get("s_tmax") == 0:
                out["s_tmax"] = float("inf")
        return {k: x for k, x in out.items() if x != takes.get(k)}

    def _model(self, v: dict, errors: list[str]) -> str:
        overrides = v["override_settings"] or {}
        if "sd_model_checkpoint" in overrides:
            return model_of(overrides["sd_model_checkpoint"]) or DEFAULT_MODEL  # checked in _kwargs
        with self.state.lock:
            return self.state.checkpoint

    def _pictures(self, v: dict, errors: list[str]) -> dict:
        """init_images and mask -> the job's image, mask, strength and sides."""
        images = v["init_images"]
        if not images:
            errors.append("init_images: required (one base64 picture)")
            return {}
        if len(images) > 1:
            errors.append(f"init_images: sd takes one picture a request, got {len(images)}")
            return {}
        image = _picture(images[0], "init_images[0]", errors)
        mask = _picture(v["mask"], "mask", errors) if v["mask"] is not None else None
        if image is None or (v["mask"] is not None and mask is None):
            return {}
        out = {"image": image[0], "strength": float(v["denoising_strength"])}
        if mask is not None:
            if v["inpaint_full_res"]:
                errors.append("inpaint_full_res: \"only masked\" inpainting is not served (sd repaints the whole "
                              "picture's masked part); send inpaint_full_res: false")
                return {}
            blur = (v["mask_blur"],) * 2 if v["mask_blur"] is not None else (v["mask_blur_x"], v["mask_blur_y"])
            out["image"], out["mask"] = prepared(image[0], mask[0], bool(v["inpainting_mask_invert"]), blur,
                                                 fill=v["inpainting_fill"] == 0)
            out["keep_unmasked"] = True     # A1111 pastes the original back outside the mask
        given = self.given
        if "width" not in given or "height" not in given:
            scale = min(1.0, MAX_SIDE / max(image[1]))
            sides = dict(zip(("width", "height"), (max(8, int(s * scale) // 8 * 8) for s in image[1])))
            out.update({k: s for k, s in sides.items() if k not in given})
        return out

    # ------------------------------------------------------------ replies

    def image_reply(self, result: GenerationResult) -> Reply:
        self._done()
        v = self.values
        pictures = result.pictures
        settings = [p.settings for p in pictures] or [{}]
        first = settings[0]
        seeds = [s.get("seed") for s in settings if s]
        options = first.get("sampler_options") or {}
        label = self.choice.label or (names.label_of(first["sampler"], options) if first else None)
        schedule = (self.choice.schedule_label if self.choice.schedule else
                    names.schedule_label_of(first.get("schedule", "default")))
        infotexts = [_infotext(p.png) for p in pictures]
        n = len(pictures)
        info = {
            "prompt": v["prompt"], "all_prompts": [v["prompt"]] * n, "negative_prompt": v["negative_prompt"],
            "all_negative_prompts": [v["negative_prompt"]] * n, "seed": seeds[0] if seeds else self.job.kwargs["seed"],
            "all_seeds": seeds, "subseed": v["subseed"], "all_subseeds": [v["subseed"]] * n, "subseed_strength": 0,
            "width": first.get("width", v["width"]), "height": first.get("height", v["height"]),
            "sampler_name": label, "cfg_scale": first.get("guidance"), "steps": first.get("num_steps"),
            "batch_size": v["batch_size"], "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": self.job.model.rsplit("/", 1)[-1], "sd_model_hash": None, "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": first.get("strength"), "extra_generation_params": {"Schedule type": schedule},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(self.started)),
            "clip_skip": (first.get("clip_skip") or 0) + 1,
            "is_using_inpainting_conditioning": self.mode == "img2img" and v["mask"] is not None
            and REGISTRY[self.job.model].mode == "inpainting",
        }
        if any("interrupted_after_step" in s for s in settings):
            info["interrupted"] = True
        parameters = {name: default for name, (_, default) in self.fields.items()}
        parameters.update(self.given)
        if self.mode == "img2img" and not v["include_init_images"]:
            parameters.update(init_images=None, mask=None)
        images = [base64.b64encode(p.png).decode("ascii") for p in pictures] if v["send_images"] else []
        return _json({"images": images, "parameters": parameters, "info": json.dumps(info)})

    def error_reply(self, status: int, messages: list[str], headers: dict | None = None) -> Reply:
        self._done()
        return error_reply(status, messages, headers)

    def _done(self):
        if self.job is not None:
            with self.state.lock:
                self.state.requests.pop(id(self.job), None)


# ---------------------------------------------------------------- reading fields


def _near_miss(name: str, fields: dict) -> str | None:
    """A known field an unknown name is most likely a typo of (`step`, `Prompt`), else None."""
    folded = {f.lower(): f for f in fields}
    if name.lower() in folded:
        return folded[name.lower()]
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.85)
    return close[0] if close else None


def prompt_problems(name: str, text: str) -> list[str]:
    """A1111 prompt syntax sd does not implement, which sd would otherwise read as plain words."""
    problems = []
    if found := EXTRA_NETWORK.search(text):
        problems.append(f"{name}: extra networks ({found.group(0)[:40]}) are not served; LoRAs are merged into "
                        "the served model, not named in the prompt")
    if AND.search(text):
        problems.append(f"{name}: AND (composable diffusion) is not served")
    rest = text
    while found := INNER_BRACKETS.search(rest):  # innermost [...] first, then the ones around them
        inner = found.group(1)
        if "|" in inner:
            problems.append(f"{name}: alternation [{inner[:40]}] is not served (sd reads (word), [word], "
                            "(word:1.2) and BREAK)")
            break
        if SCHEDULED.fullmatch(inner):
            problems.append(f"{name}: prompt editing [{inner[:40]}] is not served (sd reads (word), [word], "
                            "(word:1.2) and BREAK)")
            break
        rest = rest[:found.start()] + inner + rest[found.end():]
    return problems


def _picture(value, name: str, errors: list[str]) -> tuple[bytes, tuple[int, int]] | None:
    """A base64 picture (a data: URL too, as A1111 takes) -> (file bytes, size), checked."""
    rule = f"{name}: must be a picture in base64 (PNG, JPEG or WebP; a data: URL is fine)"
    if not isinstance(value, str) or not value:
        errors.append(f"{rule}, got {shown(value)}")
        return None
    if value.startswith(("http://", "https://")):
        errors.append(f"{name}: pictures are not fetched from URLs; send the picture itself in base64")
        return None
    if value.startswith("data:"):
        head, comma, value = value.partition(",")
        if not comma or not head.endswith(";base64"):
            errors.append(f"{rule}; a data: URL must end its header with ;base64,")
            return None
    try:
        data = base64_bytes(value, name)
        return data, image_size(data, name)
    except RequestError as e:
        errors.extend(e.messages)
        return None


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def prepared(image: bytes, mask: bytes, invert: bool, blur: tuple[int, int], fill: bool) -> tuple[bytes, bytes]:
    """(picture, mask) as A1111 reads them. The mask: its alpha channel thresholded at 128 when it
    has transparency (opaque repaints), else its grey level; flipped by inpainting_mask_invert;
    blurred by mask_blur_x / mask_blur_y (Gaussian standard deviations, in pixels). With `fill`
    (inpainting_fill 0), the picture's area to repaint is first painted over with the colours
    around it, spread by ever narrower blurs (after A1111's masking fill)."""
    from PIL import Image, ImageFilter, ImageOps
    with Image.open(io.BytesIO(mask)) as opened:
        m = ImageOps.exif_transpose(opened)
        if m.mode == "RGBA" and m.getextrema()[-1] != (255, 255):
            m = m.getchannel("A").point(lambda a: 255 if a > 128 else 0)
        else:
            m = m.convert("L")
    if invert:
        m = ImageOps.invert(m)
    if any(blur):
        m = m.filter(ImageFilter.GaussianBlur(blur))
    if not fill:
        return image, _png(m)
    with Image.open(io.BytesIO(image)) as opened:
        picture = ImageOps.exif_transpose(opened).convert("RGB")
    return _png(filled(picture, m.resize(picture.size))), _png(m)


def filled(picture, mask):
    """The picture with its masked (white) part painted over by the kept part's colours: the kept
    pixels alone (premultiplied, so the hole adds no black) blurred at radii 256 down to 2, each
    layer over the wider one, the kept pixels themselves on top."""
    from PIL import Image, ImageFilter, ImageOps
    kept = picture.convert("RGBA")
    kept.putalpha(ImageOps.invert(mask))
    kept = kept.convert("RGBa")
    out = Image.new("RGBA", picture.size)
    for radius in (256, 64, 16, 4, 2):
        out.alpha_composite(kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA"))
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")


def _infotext(png: bytes) -> str:
    """A picture's one-line settings (its `parameters` text chunk, A1111's infotext form; sd.pngmeta)."""
    from PIL import Image
    with Image.open(io.BytesIO(png)) as image:
        return image.text.get("parameters", "")


# ---------------------------------------------------------------- the other routes

# (path, method) of the routes `call` answers; app.py routes them there after authorizing.
CALLS = [("/sdapi/v1/samplers", "GET"), ("/sdapi/v1/schedulers", "GET"), ("/sdapi/v1/sd-models", "GET"),
         ("/sdapi/v1/scripts", "GET"), ("/sdapi/v1/options", "GET"), ("/sdapi/v1/options", "POST"),
         ("/sdapi/v1/progress", "GET"), ("/sdapi/v1/interrupt", "POST")]
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")   # how A1111 (pydantic) reads a bool


async def call(state: ServerState, method: str, path: str, query: dict, body: bytes) -> Reply:
    """Everything under /sdapi/v1 but txt2img and img2img."""
    name = path.rsplit("/", 1)[-1]
    if name == "samplers":
        return _json(names.sampler_list())
    if name == "schedulers":
        return _json(names.schedule_list())
    if name == "sd-models":
        missing = state.service.cache.registry.missing
        return _json([{"title": model_title(m), "model_name": m.rsplit("/", 1)[-1], "hash": None, "sha256": None,
                       "filename": m, "config": None} for m in REGISTRY if not missing(m)])
    if name == "scripts":
        return _json({"txt2img": [], "img2img": []})
    if name == "options" and method == "GET":
        return _json(state.options())
    if name == "options":
        if not body.strip():
            raise RequestError(400, "body: empty; expected a JSON object of options such as "
                                    "{\"sd_model_checkpoint\": \"...\"}")
        state.set_options(parse_json(body))
        return _json(None)
    if name == "progress":
        return await progress(state, query)
    return interrupt(state)


async def progress(state: ServerState, query: dict) -> Reply:
    """A1111's progress of the running job (any dialect's): 0.01 + steps done / steps, capped at 1;
    the seconds left at that rate; the state; a preview of the last step's prediction (sd/preview.py)."""
    skip = query.get("skip_current_image", "false").lower()
    if skip not in TRUE + FALSE:
        raise RequestError(400, f"skip_current_image: must be true or false, got {shown(query['skip_current_image'])}")
    ticket = state.service.worker.running
    st = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
          "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if ticket is None or ticket.state != "running" or ticket.started is None:
        return _json({"progress": 0, "eta_relative": 0, "state": st, "current_image": None, "textinfo": None})
    request = state.request_of(ticket.job)
    step, steps, denoised = ticket.step, ticket.steps, ticket.denoised
    done = 0.01 + (step / steps if steps else 0)
    elapsed = time.time() - ticket.started
    st.update(job=request.mode if request else "generation", job_count=1, sampling_step=step, sampling_steps=steps,
              job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(ticket.started)),
              interrupted=bool(request and request.interrupted))
    pipe = state.pipeline(ticket)
    image = None
    if skip in FALSE and denoised is not None and pipe is not None:
        import anyio
        image = await anyio.to_thread.run_sync(preview_png, pipe, denoised)
    return _json({"progress": min(done, 1.0), "eta_relative": elapsed / done - elapsed, "state": st,
                  "current_image": image, "textinfo": f"step {step} of {steps}"})


def preview_png(pipe, latents) -> str:
    """The batch's previews side by side, one pixel per latent pixel, as base64 PNG."""
    from PIL import Image

    from ..preview import preview
    pictures = preview(pipe, latents)
    strip = Image.new("RGB", (sum(p.width for p in pictures), max(p.height for p in pictures)))
    for k, p in enumerate(pictures):
        strip.paste(p, (k * pictures[0].width, 0))
    return base64.b64encode(_png(strip)).decode("ascii")


def interrupt(state: ServerState) -> Reply:
    """Stop the running jobs (a batch may run several) that A1111 requests made, each at its next
    step or checkpoint (another dialect's clients get no say from here); their requests then answer
    with what they have. Always {} as A1111."""
    for ticket in state.service.worker.running_batch:
        request = state.request_of(ticket.job)
        if request is not None and ticket.state in ("queued", "running"):
            request.interrupted = True
            state.service.worker.abandon(ticket)
    return _json({})
