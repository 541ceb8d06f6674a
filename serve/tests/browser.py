"""Drives vl-serve's page (GET /) in headless Chromium with Playwright; run by browser.rs.

Usage: browser.py BASE_URL VIDEO IMAGE CHROMIUM

Opens the page with ?max_tokens=8&temperature=0&ignore_eos=1, uploads VIDEO through the file
input, asks a question (Enter), waits for the streamed answer and its time-to-first-token and
tokens/s figures, asks a follow-up (the button), checks what the page sent, shows a server
error, starts a new conversation, and asks about IMAGE dropped on the drop zone. Prints one JSON line of findings; exits 1 with a message
on the first failed check. Every wait has a timeout.
"""

import base64
import json
import re
import sys

from playwright.sync_api import sync_playwright

WAIT_MS = 60_000
MAX_TOKENS = 8
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STATS = re.compile(r"^first token after \d+\.\d\d s · (\d+) tokens? · \d+\.\d tokens/s")

# Counts the changes to each answer's text, to tell a streamed answer from one set at once.
COUNT_UPDATES = """
window.__answerUpdates = [];
new MutationObserver((records) => {
  for (const r of records) {
    const li = r.target.closest && r.target.closest("li.assistant");
    if (!li || !r.target.classList.contains("text")) continue;
    const i = [...document.querySelectorAll("#log li.assistant")].indexOf(li);
    window.__answerUpdates[i] = (window.__answerUpdates[i] || 0) + 1;
  }
}).observe(document, {childList: true, subtree: true});
"""


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def main():
    base, video, image, chromium = sys.argv[1:5]
    found = {}
    problems = []  # page errors, console errors, requests to other origins
    posts = []  # bodies of POST /v1/chat/completions
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS, timeout=WAIT_MS)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.add_init_script(COUNT_UPDATES)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))

            def on_request(r):
                if not (r.url.startswith(base + "/") or r.url.startswith(("data:", "blob:"))):
                    problems.append(f"request outside the server: {r.url}")
                if r.method == "POST" and r.url == base + "/v1/chat/completions":
                    posts.append(json.loads(r.post_data or "{}"))

            page.on("request", on_request)

            response = page.goto(f"{base}/?max_tokens={MAX_TOKENS}&temperature=0&ignore_eos=1")
            check(response is not None and response.status == 200, "GET / did not answer 200")
            found["content_type"] = response.headers.get("content-type")
            # Locators wait without eval (the page's Content-Security-Policy forbids it).
            page.locator("#model").filter(has_not_text="loading…").wait_for()
            found["model"] = page.text_content("#model")

            # Labels name the controls (what assistive technology and the keyboard rely on).
            for label in ["Drop a video or an image here, or choose one", "Question",
                          "Most tokens per answer", "Temperature (0: greedy)"]:
                check(page.get_by_label(label, exact=True).count() == 1, f"no control labelled {label!r}")

            page.set_input_files("#file", video)
            page.locator("#status", has_text="is ready").wait_for()
            check(page.locator("#preview video").count() == 1, "no preview of the video")

            # First question, asked with the keyboard.
            page.focus("#question")
            page.keyboard.type("What happens in this video?")
            page.keyboard.press("Enter")
            answers = page.locator("#log li.assistant")
            answers.nth(0).locator(".stats").wait_for()
            first = answers.nth(0).locator(".text").text_content()
            stats1 = answers.nth(0).locator(".stats").text_content()
            check(first, "the first answer is empty")
            m = STATS.match(stats1)
            check(m, f"no time-to-first-token and tokens/s figures: {stats1!r}")
            check(int(m.group(1)) == MAX_TOKENS, f"not {MAX_TOKENS} tokens: {stats1!r}")
            found["first_answer"] = first
            found["first_stats"] = stats1

            # Follow-up, asked with the mouse.
            page.fill("#question", "And then?")
            page.click("#send")
            answers.nth(1).locator(".stats").wait_for()
            second = answers.nth(1).locator(".text").text_content()
            stats2 = answers.nth(1).locator(".stats").text_content()
            check(second, "the follow-up's answer is empty")
            check(STATS.match(stats2), f"no figures for the follow-up: {stats2!r}")
            found["second_answer"] = second
            found["second_stats"] = stats2
            updates = page.evaluate("window.__answerUpdates")
            check(len(updates) == 2 and all(n >= 2 for n in updates), f"answers not shown piece by piece: {updates}")
            found["answer_updates"] = updates
            check(page.locator("#log li").count() == 4, "the log does not hold two questions and two answers")
            check(page.is_disabled("#file"), "the media can be changed mid-conversation")

            # What was sent: the video as a data: URL in the first user message, the whole
            # conversation again with the follow-up, streamed with usage.
            check(len(posts) == 2, f"{len(posts)} chat requests, not 2")
            for body in posts:
                check(body.get("stream") is True, "not streamed")
                check(body.get("stream_options", {}).get("include_usage") is True, "no include_usage")
                check(body.get("model") == found["model"], "not the listed model")
                check(body.get("max_tokens") == MAX_TOKENS and body.get("ignore_eos") is True, "query knobs lost")
            part = posts[0]["messages"][0]["content"][0]
            check(part["type"] == "video_url", f"first part is {part['type']}")
            check(part["video_url"]["url"].startswith("data:video/mp4;base64,"), "the video is not a data: URL")
            roles = [m["role"] for m in posts[1]["messages"]]
            check(roles == ["user", "assistant", "user"], f"follow-up roles {roles}")
            check(posts[1]["messages"][0] == posts[0]["messages"][0], "the follow-up changed the first message")
            check(posts[1]["messages"][1]["content"] == first, "the follow-up did not resend the first answer")

            # A server error is shown, and the question is given back (Chromium logs the 400).
            before = len(problems)
            page.click("summary")
            page.fill("#max-tokens", "100000")
            page.fill("#question", "Tell me more.")
            page.click("#send")
            page.wait_for_selector("#error:not([hidden])")
            error = page.text_content("#error")
            check("400" in error and "context" in error, f"the error is not shown readably: {error!r}")
            check(page.input_value("#question") == "Tell me more.", "the refused question was lost")
            check(page.locator("#log li").count() == 4, "the refused question stayed in the log")
            found["error"] = error
            logged = problems[before:]
            check(len(logged) == 1 and "status of 400" in logged[0], f"unexpected: {logged}")
            del problems[before:]

            # A new conversation empties the log and frees the media input.
            page.click("#new")
            check(page.locator("#log li").count() == 0, "the log was not emptied")
            check(not page.is_disabled("#file") and page.locator("#preview *").count() == 0, "media kept")
            check(page.is_hidden("#error"), "the error stayed")

            # An image dropped on the drop zone (a synthetic drop event carrying the file).
            page.fill("#max-tokens", str(MAX_TOKENS))
            with open(image, "rb") as f:
                png = base64.b64encode(f.read()).decode()
            transfer = page.evaluate_handle("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const t = new DataTransfer();
                t.items.add(new File([bytes], "frame.png", {type: "image/png"}));
                return t;
            }""", png)
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
            page.locator("#status", has_text="frame.png is ready").wait_for()
            check(page.locator("#preview img").count() == 1, "no preview of the image")
            check(page.eval_on_selector("#file", "e => e.files.length") == 1, "the file input does not hold it")
            page.fill("#question", "What is it?")
            page.press("#question", "Enter")
            answers.nth(0).locator(".stats").wait_for()
            check(STATS.match(answers.nth(0).locator(".stats").text_content()), "no figures for the image")
            check(len(posts) == 4, f"{len(posts)} chat requests, not 4")
            part = posts[3]["messages"][0]["content"][0]
            check(part["type"] == "image_url", f"the dropped image went as {part['type']}")
            check(part["image_url"]["url"].startswith("data:image/png;base64,"), "the image is not a data: URL")
            check(len(posts[3]["messages"]) == 1, "the new conversation kept the old one")
        finally:
            browser.close()
    check(not problems, "; ".join(problems))
    print(json.dumps(found))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"browser check failed: {e}", file=sys.stderr)
        sys.exit(1)
