// Building elements from data. Every text that came from the server (labels are the training data's
// folder names) goes in through textContent, never as markup.

/** A new element with text content and attributes (attribute values are never parsed as HTML). */
export function element(tag, text = "", attributes = {}) {
  const node = document.createElement(tag);
  if (text !== "") node.textContent = text;
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

export function show(node, visible) {
  node.hidden = !visible;
}

export function byId(id) {
  return document.getElementById(id);
}
