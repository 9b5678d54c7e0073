// The inpainting mask, painted with the pointer (mouse, pen or finger) on a canvas laid over the
// input picture, at the picture's own size. Sent as a PNG: white = repaint, black = keep.

const PAINT = "rgb(255, 32, 96)";
const OPAQUE = 128; // alpha from which a pixel counts as painted (strokes have soft, anti-aliased edges)

export class Mask {
  constructor(canvas, onChange) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d", { willReadFrequently: true });
    this.onChange = onChange;
    this.brush = 8;
    this.erase = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointercancel"]) canvas.addEventListener(name, () => this.up());
  }

  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.onChange();
  }

  // Where the pointer is, in the picture's pixels (the canvas is shown scaled to the page).
  at(event) {
    const box = this.canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * this.canvas.width / box.width,
      (event.clientY - box.top) * this.canvas.height / box.height];
  }

  down(event) {
    if (event.button !== 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.last = this.at(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const point = this.at(event);
    this.stroke(this.last, point);
    this.last = point;
  }

  up() {
    if (!this.last) return;
    this.last = null;
    this.onChange();
  }

  stroke([x0, y0], [x1, y1]) {
    const c = this.context;
    c.globalCompositeOperation = this.erase ? "destination-out" : "source-over";
    c.strokeStyle = c.fillStyle = PAINT;
    c.lineWidth = this.brush;
    c.lineCap = c.lineJoin = "round";
    c.beginPath();
    if (x0 === x1 && y0 === y1) {
      c.arc(x0, y0, this.brush / 2, 0, 2 * Math.PI);
      c.fill();
    } else {
      c.moveTo(x0, y0);
      c.lineTo(x1, y1);
      c.stroke();
    }
  }

  clear() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.onChange();
  }

  invert() {
    this.mapPixels((painted) => !painted);
    this.onChange();
  }

  // Redraw every pixel as painted or not: f(painted) -> painted.
  mapPixels(f) {
    const { width, height } = this.canvas;
    const image = this.context.getImageData(0, 0, width, height);
    const [r, g, b] = PAINT.match(/\d+/g).map(Number);
    const d = image.data;
    for (let i = 0; i < d.length; i += 4) {
      const on = f(d[i + 3] >= OPAQUE);
      d[i] = r; d[i + 1] = g; d[i + 2] = b; d[i + 3] = on ? 255 : 0;
    }
    this.context.globalCompositeOperation = "source-over";
    this.context.putImageData(image, 0, 0);
  }

  // The share of the picture painted, 0 to 1.
  coverage() {
    const { width, height } = this.canvas;
    if (!width || !height) return 0;
    const d = this.context.getImageData(0, 0, width, height).data;
    let painted = 0;
    for (let i = 3; i < d.length; i += 4) painted += d[i] >= OPAQUE;
    return painted / (width * height);
  }

  // The mask as a PNG data URL: white where painted, black elsewhere.
  async png() {
    const { width, height } = this.canvas;
    const out = new OffscreenCanvas(width, height);
    const context = out.getContext("2d");
    const image = this.context.getImageData(0, 0, width, height);
    const d = image.data;
    for (let i = 0; i < d.length; i += 4) {
      const v = d[i + 3] >= OPAQUE ? 255 : 0;
      d[i] = d[i + 1] = d[i + 2] = v;
      d[i + 3] = 255;
    }
    context.putImageData(image, 0, 0);
    return dataUrl(await out.convertToBlob({ type: "image/png" }));
  }
}

export function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
