"""`bitnet chat` in a pseudo-terminal, as a person types into it (run by tests/cli.rs). Standard library only.

Usage: chat_pty.py BITNET TINY_MODEL
Checks Ctrl+C (stops a reply and keeps the conversation; once at the prompt only reminds; twice exits), multi-line
input (a trailing backslash and \"\"\" blocks), /system, /clear, /save, /exit, and a conversation that outgrows the
context (the oldest turns dropped, said on stderr). Prints "chat pty OK" when every check passed; any failure raises.
"""
import json, os, pty, re, select, signal, sys, tempfile, time

BIN, TINY = sys.argv[1], sys.argv[2]
tmp = tempfile.mkdtemp(prefix="bitnet-chat-pty-")


class Chat:
    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execv(BIN, [BIN, "chat", *args])
        self.out = ""  # not yet matched by expect
        self.transcript = ""  # everything

    def read(self, timeout):
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child has exited and the terminal closed
            return False
        if not data:
            return False
        text = data.decode(errors="replace")
        self.out += text
        self.transcript += text
        return True

    def expect(self, pattern, timeout=120):
        """Waits for `pattern` (a regex) in the output after what earlier expects consumed."""
        deadline = time.time() + timeout
        while True:
            m = re.search(pattern, self.out)
            if m:
                self.out = self.out[m.end():]
                return m
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output since the last match:\n{self.out}")
            if not self.read(min(1, left)):
                time.sleep(0.05)

    def send(self, text):
        os.write(self.fd, text.encode())

    def line(self, text):
        self.send(text + "\n")

    def wait(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return status
            self.read(0.1)
        raise AssertionError(f"chat still running after {timeout} s:\n{self.out}")

    def saved(self, name):
        path = os.path.join(tmp, name)
        self.line(f"/save {path}")
        self.expect(r"\(saved \d+ messages")
        with open(path) as f:
            return json.load(f)["messages"]


# The default model: a reply long enough to interrupt.
c = Chat("--temp", "0.7", "--seed", "1", "-n", "300", "--system", "You are a storyteller.")
c.expect(r"> ")
c.line("Write a very long story about a dragon who learns to sing, with many chapters.")
c.expect(r"chapters\.\r?\n")  # the terminal's echo of the line
c.expect(r"\w+ \w+ \w+")  # some of the reply has come
c.send("\x03")
c.expect(r"\(reply stopped\)")
c.expect(r"> ")
messages = c.saved("stopped.json")
assert [m["role"] for m in messages] == ["system", "user", "assistant"], messages
assert messages[2]["content"], "the stopped reply is kept in the conversation"
# The conversation goes on.
c.line("Thanks. Now say hello.")
c.expect(r"\[prompt: .*generated: [1-9]")
c.expect(r"> ")
assert len(c.saved("continued.json")) == 5
# One Ctrl+C at the prompt only reminds; two in a row exit.
c.send("\x03")
c.expect(r"Ctrl\+C again to exit")
time.sleep(1.5)
c.line("/help")
c.expect(r"/clear")
c.send("\x03")
time.sleep(0.2)
c.send("\x03")
status = c.wait()
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, status

# The tiny model (fast): multi-line input, commands, and a conversation longer than its context.
c = Chat("-m", TINY, "--temp", "0", "-n", "16", "--ctx", "256")
c.expect(r"> ")
c.line("first line \\")
c.expect(r"\.\.\. ")
c.line("second line")
c.expect(r"\[prompt")
c.expect(r"> ")
c.line('"""')
c.line("alpha")
c.line("beta")
c.line('"""')
c.expect(r"\[prompt")
c.expect(r"> ")
users = [m["content"] for m in c.saved("multi.json") if m["role"] == "user"]
assert users == ["first line \nsecond line", "alpha\nbeta"], users
c.line("/system Be brief.")
c.expect(r"system message set")
assert c.saved("system.json")[0] == {"role": "system", "content": "Be brief."}
c.line("/clear")
c.expect(r"conversation cleared")
assert c.saved("cleared.json") == [{"role": "system", "content": "Be brief."}]
c.line("/nonsense")
c.expect(r"unknown command /nonsense")
for i in range(8):
    c.line(f"Message number {i}: the quick brown fox jumps over the lazy dog again and again.")
    c.expect(r"\[prompt")
    c.expect(r"> ")
assert "outgrew the context of 256 tokens: dropped the" in c.transcript, c.transcript
kept = c.saved("overflow.json")
assert kept[0]["role"] == "system" and len(kept) < 1 + 2 * 8, kept
assert kept[-2]["content"].startswith("Message number 7"), kept
c.line("/exit")
status = c.wait()
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print("chat pty OK")
