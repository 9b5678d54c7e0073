"""AUTOMATIC1111's sampler and schedule names -> sd's (`sd.samplers.SAMPLERS`, `sd.schedule.SCHEDULES`):
the one table behind the A1111 dialect's requests and its /samplers and /schedulers lists.

A1111 (1.9 and later) names the sampler ("DPM++ 2M") and the schedule ("scheduler": "Karras")
apart, "Automatic" meaning the sampler's own (Karras for DPM++ 2M, Exponential for DPM++ 2M SDE,
the model's spacing for Euler); older versions fused them into one name ("DPM++ 2M Karras"). Both
are read. Names sd has no algorithm for are refused by name, never replaced by a neighbour:
the samplers DPM fast, DPM adaptive, Restart and DDIM CFG++, the schedules Uniform, Normal,
Polyexponential and KL Optimal.

Known differences from A1111 on the same names: A1111 drops the next-to-last sigma for DPM2,
DPM2 a and DPM++ 3M SDE (sd runs the schedule as it is); its "Automatic" for samplers with no
schedule of their own is k-diffusion's uniform timesteps, where sd takes the model's own spacing
(as diffusers does); A1111's SDE samplers draw Brownian-tree noise, sd's draw fresh Gaussian noise
from the seed's generator.
"""

from dataclasses import dataclass, field

from ..errors import InputError


@dataclass(frozen=True)
class Sampler:
    label: str                      # A1111's name, as its UI and API write it
    sampler: str                    # sd's
    aliases: tuple[str, ...]        # A1111's own aliases (k-diffusion's function-style names)
    schedule: str | None = None     # what A1111's "Automatic" schedule means for it (its 'scheduler' option)
    options: dict = field(default_factory=dict)  # sd sampler_options the name implies


@dataclass(frozen=True)
class Schedule:
    name: str                       # A1111's name ("karras")
    label: str                      # and label ("Karras"); requests may use either, or an alias
    schedule: str | None            # sd's; None: "Automatic", the sampler's own
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0       # as A1111 lists them
    need_inner_model: bool = False


SAMPLERS = (
    Sampler("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",), "karras"),
    Sampler("DPM++ SDE", "dpmpp_sde", ("k_dpmpp_sde",), "karras"),
    Sampler("DPM++ 2M SDE", "dpmpp_2m_sde", ("k_dpmpp_2m_sde",), "exponential"),
    Sampler("DPM++ 2M SDE Heun", "dpmpp_2m_sde", ("k_dpmpp_2m_sde_heun",), "exponential", {"solver_type": "heun"}),
    Sampler("DPM++ 2S a", "dpmpp_2s_ancestral", ("k_dpmpp_2s_a",), "karras"),
    Sampler("DPM++ 3M SDE", "dpmpp_3m_sde", ("k_dpmpp_3m_sde",), "exponential"),
    Sampler("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "euler", ("k_euler",)),
    Sampler("LMS", "lms", ("k_lms",)),
    Sampler("Heun", "heun", ("k_heun",)),
    Sampler("DPM2", "dpm_2", ("k_dpm_2",), "karras"),
    Sampler("DPM2 a", "dpm_2_ancestral", ("k_dpm_2_a",), "karras"),
    Sampler("DDIM", "ddim", ("ddim",)),
    Sampler("PLMS", "plms", ("plms",)),
    Sampler("UniPC", "unipc", ("unipc",)),
    Sampler("LCM", "lcm", ("k_lcm",)),
)
SAMPLERS_NOT_IN_SD = ("DPM fast", "DPM adaptive", "Restart", "DDIM CFG++")

AUTOMATIC = Schedule("automatic", "Automatic", None)
SCHEDULES = (
    AUTOMATIC,
    Schedule("karras", "Karras", "karras", default_rho=7.0),
    Schedule("exponential", "Exponential", "exponential"),
    Schedule("sgm_uniform", "SGM Uniform", "sgm_uniform", ("SGMUniform",), need_inner_model=True),
    Schedule("align_your_steps", "Align Your Steps", "align_your_steps"),
    Schedule("simple", "Simple", "simple", need_inner_model=True),
    Schedule("ddim", "DDIM", "ddim_uniform", need_inner_model=True),
    Schedule("beta", "Beta", "beta", need_inner_model=True),
)
SCHEDULES_NOT_IN_SD = ("Uniform", "Normal", "Polyexponential", "KL Optimal")

_SAMPLER_BY_NAME = {name: s for s in SAMPLERS for name in (s.label, *s.aliases)}
_SCHEDULE_BY_NAME = {name: s for s in SCHEDULES for name in (s.name, s.label, *s.aliases)}


@dataclass(frozen=True)
class Choice:
    """A request's sampler and schedule, resolved: the A1111 labels it reports and sd's arguments."""
    label: str | None               # None: the model's default sampler
    schedule_label: str
    sampler: str | None             # generate(sampler=...); None: the model's default
    schedule: str | None            # generate(schedule=...); None: the sampler's (or model's) default
    options: dict


def sampler_list() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's fields (name, aliases, options), sd's name added to the options."""
    return [{"name": s.label, "aliases": list(s.aliases),
             "options": {**({"scheduler": s.schedule} if s.schedule else {}), **s.options, "sd_sampler": s.sampler}}
            for s in SAMPLERS]


def schedule_list() -> list[dict]:
    """GET /sdapi/v1/schedulers: A1111's fields (name, label, aliases, default_rho, need_inner_model)."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
             "need_inner_model": s.need_inner_model} for s in SCHEDULES]


def _split_fused(name: str) -> tuple[str, Schedule | None]:
    """"DPM++ 2M Karras" -> ("DPM++ 2M", Karras), as A1111 reads the names of its older versions."""
    for schedule in SCHEDULES:
        for suffix in (schedule.label, schedule.name, *schedule.aliases):
            if name.endswith(" " + suffix) and name[:-len(suffix) - 1] in _SAMPLER_BY_NAME:
                return name[:-len(suffix) - 1], schedule
    return name, None


def _unknown(field: str, name: str, known: list[str], missing: tuple[str, ...]) -> InputError:
    if name in missing:
        return InputError(f"{field}: {name!r} is an A1111 {field.split('_')[0]} sd does not implement "
                          f"(sd has: {', '.join(known)})")
    return InputError(f"{field}: {name!r} is not one of {', '.join(known)}")


def choose(sampler_name: str | None, scheduler: str | None, field: str = "sampler_name") -> Choice:
    """A1111's sampler and schedule names -> a Choice. An explicit `scheduler` other than
    Automatic wins, as in A1111; contradicting a schedule fused into the sampler's name is an error
    rather than a silent choice. Raises InputError naming the field and the accepted names."""
    fused = None
    if sampler_name:
        sampler_name, fused = _split_fused(sampler_name)
        if sampler_name not in _SAMPLER_BY_NAME:
            raise _unknown(field, sampler_name, [s.label for s in SAMPLERS], SAMPLERS_NOT_IN_SD)
    if scheduler and scheduler not in _SCHEDULE_BY_NAME:
        raise _unknown("scheduler", scheduler, [s.label for s in SCHEDULES], SCHEDULES_NOT_IN_SD)
    explicit = _SCHEDULE_BY_NAME[scheduler] if scheduler else AUTOMATIC
    if fused is not None and explicit is not AUTOMATIC and explicit is not fused:
        raise InputError(f"scheduler: {scheduler!r} contradicts the {fused.label} schedule in {field} "
                         f"{sampler_name + ' ' + fused.label!r}; give one of them")
    schedule = explicit if explicit is not AUTOMATIC else fused or AUTOMATIC
    sampler = _SAMPLER_BY_NAME.get(sampler_name) if sampler_name else None
    if schedule is AUTOMATIC and sampler is not None and sampler.schedule:
        schedule = next(s for s in SCHEDULES if s.schedule == sampler.schedule)
    return Choice(sampler.label if sampler else None, schedule.label, sampler.sampler if sampler else None,
                  schedule.schedule, dict(sampler.options) if sampler else {})


def label_of(sampler: str, options: dict | None = None) -> str:
    """sd's sampler name (and options) -> A1111's label, for samplers a request left to the model."""
    return next((s.label for s in SAMPLERS if s.sampler == sampler and s.options == (options or {})), sampler)


def schedule_label_of(schedule: str) -> str:
    return next((s.label for s in SCHEDULES if s.schedule == schedule), "Automatic")
