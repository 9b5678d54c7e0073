// The text chunks of a PNG file (PNG spec, section 11.3.4): tEXt (Latin-1) and uncompressed iTXt
// (UTF-8). sd writes each image's settings as JSON in the "sd" chunk (sd/pngmeta.py).

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

export function pngText(bytes) {
  if (!SIGNATURE.every((b, i) => bytes[i] === b)) throw new Error("not a PNG file");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const texts = {};
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at);
    const type = latin1.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    const nul = data.indexOf(0);
    if (type === "tEXt" && nul > 0) {
      texts[latin1.decode(data.subarray(0, nul))] = latin1.decode(data.subarray(nul + 1));
    } else if (type === "iTXt" && nul > 0 && data[nul + 1] === 0) {
      // keyword, NUL, compression flag (0), method, language tag, NUL, translated keyword, NUL, text
      const language = data.indexOf(0, nul + 3);
      const translated = data.indexOf(0, language + 1);
      texts[latin1.decode(data.subarray(0, nul))] = utf8.decode(data.subarray(translated + 1));
    } else if (type === "IEND") {
      break;
    }
    at += 12 + length; // length, type, data, CRC
  }
  return texts;
}

// The settings sd stored in the image ({} when there are none).
export function settingsOf(bytes) {
  const text = pngText(bytes).sd;
  return text ? JSON.parse(text) : {};
}
