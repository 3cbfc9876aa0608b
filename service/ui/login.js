// The sign-in page (answered with 401 when the server has an inference token): keep the token for this
// tab, leave a same-site cookie so "/" opens, and go back to the page.

import { TOKEN_KEY } from "./api.js";

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value;
  sessionStorage.setItem(TOKEN_KEY, value);
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = `${TOKEN_KEY}=${encodeURIComponent(value)}; path=/; SameSite=Strict${secure}`;
  location.replace("/");
});

if (document.cookie.split("; ").some((item) => item.startsWith(TOKEN_KEY + "="))) {
  // back here with a cookie: the server did not accept that token
  const error = document.getElementById("error");
  error.textContent = "That token was not accepted: missing or wrong inference token.";
  error.hidden = false;
  document.cookie = `${TOKEN_KEY}=; path=/; max-age=0; SameSite=Strict`;
  sessionStorage.removeItem(TOKEN_KEY);
}
