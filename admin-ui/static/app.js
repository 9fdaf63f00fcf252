// Small conveniences only; every action also works without JavaScript.
document.addEventListener("click", (e) => {
  const all = e.target.closest("[data-select-all]");
  if (all) document.querySelectorAll("input[name=ids]").forEach((b) => { b.checked = all.checked; });
  const copy = e.target.closest("[data-copy]");
  if (copy) {
    const el = document.getElementById(copy.dataset.copy);
    if (el && navigator.clipboard) navigator.clipboard.writeText(el.textContent);
  }
});
