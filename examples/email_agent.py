"""The email agent: sends the emails queued in ``mailer``."""
import os

from microagent import MicroAgent, consumer, load_stuff, on

signals, queues = load_stuff(os.path.join(os.path.dirname(__file__), 'signals.json'))


class EmailAgent(MicroAgent):
    @on('pre_start')
    def setup(self):
        self.sent = 0

    @consumer(queues.mailer, timeout=10)
    async def send_email(self, text, email, **kwargs):
        self.sent += 1
        self.log.info('Email #%d to %s: %s', self.sent, email, text)
