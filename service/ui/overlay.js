// What the model sees and where it looked: the centre crop of the eval preprocessing (resize the shorter
// side to `resize`, centre-crop `crop`, as service/preprocess.py does) drawn on a canvas, and the Grad-CAM
// heatmap (grayscale PNG at crop x crop) coloured with a blue-to-red ramp whose alpha follows the heat.

/** Python's round(): halves go to the even neighbour (the server computes the crop offset with it). */
function roundHalfEven(value) {
  const floor = Math.floor(value);
  const rest = value - floor;
  if (rest !== 0.5) return Math.round(value);
  return floor % 2 === 0 ? floor : floor + 1;
}

/** The source rectangle [x, y, width, height] of the centre crop in the image's own pixels. */
export function cropBox(width, height, resize, crop) {
  const portrait = width <= height;
  const resizedWidth = portrait ? resize : Math.floor((resize * width) / height);
  const resizedHeight = portrait ? Math.floor((resize * height) / width) : resize;
  const left = roundHalfEven((resizedWidth - crop) / 2);
  const top = roundHalfEven((resizedHeight - crop) / 2);
  const scaleX = width / resizedWidth;
  const scaleY = height / resizedHeight;
  return [left * scaleX, top * scaleY, crop * scaleX, crop * scaleY];
}

/** Draw the model's centre crop of `image` (an ImageBitmap) onto `canvas`, `crop` pixels square. */
export function drawCrop(canvas, image, preprocess) {
  const crop = preprocess.crop;
  canvas.width = crop;
  canvas.height = crop;
  const context = canvas.getContext("2d");
  context.imageSmoothingQuality = "high";
  const [x, y, w, h] = cropBox(image.width, image.height, preprocess.resize, crop);
  context.drawImage(image, x, y, w, h, 0, 0, crop, crop);
}

// A short "turbo"-like ramp: blue (cold) through green and yellow to red (hot).
const RAMP = [
  [48, 18, 59],
  [70, 130, 240],
  [30, 210, 160],
  [170, 230, 50],
  [250, 180, 30],
  [220, 40, 10],
];

function colour(value) {
  const position = (value / 255) * (RAMP.length - 1);
  const low = Math.floor(position);
  const high = Math.min(low + 1, RAMP.length - 1);
  const t = position - low;
  return RAMP[low].map((channel, i) => Math.round(channel + (RAMP[high][i] - channel) * t));
}

/** The grayscale heatmap PNG coloured, as a PNG blob of the same size (transparent where it is cold). */
export async function colourHeatmap(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const heat = data[i];
    const [r, g, b] = colour(heat);
    data[i] = r;
    data[i + 1] = g;
    data[i + 2] = b;
    data[i + 3] = Math.round(40 + (215 * heat) / 255); // cold areas barely tinted, hot ones nearly opaque
  }
  context.putImageData(pixels, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}
