// This session's results, newest first: each picture with the settings read back from its own PNG
// (the "sd" text chunk), a download link, "Use as input" and "Reuse settings".

import { settingsOf } from "./png.js";

const SHOWN = [ // [settings key, label]
  ["seed", "Seed"], ["size", "Size"], ["num_steps", "Steps"], ["guidance", "Guidance"], ["sampler", "Sampler"],
  ["schedule", "Schedule"], ["strength", "Strength"], ["model", "Model"], ["prompt", "Prompt"],
  ["negative_prompt", "Negative prompt"],
];

function element(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

export class Gallery {
  constructor(list, empty, { useAsInput, reuse }) {
    this.list = list;
    this.empty = empty;
    this.actions = { useAsInput, reuse };
  }

  // base64: the PNG file as the API sent it. Returns the settings the file carries.
  add(base64) {
    const png = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const settings = settingsOf(png);
    const blob = new Blob([png], { type: "image/png" });
    const url = `data:image/png;base64,${base64}`; // the file itself: what is shown is what downloads
    const seed = settings.seed ?? "unknown";
    const image = element("img", { src: url, alt: `Result: ${settings.prompt ?? "image"}, seed ${seed}` });
    image.classList.toggle("pixelated", settings.width < 256); // small pictures shown large: sharp pixels
    const values = { ...settings, size: settings.width && `${settings.width}×${settings.height}` };
    const details = element("dl", { className: "settings" });
    for (const [key, label] of SHOWN) {
      if (values[key] === undefined || values[key] === null || values[key] === "") continue;
      details.append(element("dt", {}, label), element("dd", { className: `setting-${key}` }, String(values[key])));
    }
    const download = element("a", { href: url, download: `sd-${seed}.png`, className: "button" }, "Download");
    const use = element("button", { type: "button" }, "Use as input");
    use.addEventListener("click", () => this.actions.useAsInput(blob));
    const reuse = element("button", { type: "button" }, "Reuse settings");
    reuse.addEventListener("click", () => this.actions.reuse(settings));
    const item = element("li", { className: "result" },
      element("figure", {}, image, element("figcaption", {}, details,
        element("div", { className: "row" }, download, use, reuse))));
    this.list.prepend(item);
    this.empty.hidden = true;
    return settings;
  }
}
