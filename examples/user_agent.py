"""The user agent: announces users, posts comments, asks for counts, sends reports."""
import os

from microagent import MicroAgent, cron, load_stuff, on, periodic, receiver

signals, queues = load_stuff(os.path.join(os.path.dirname(__file__), 'signals.json'))


class UserAgent(MicroAgent):
    @on('pre_start')
    def setup(self):
        self.comments_posted = 0

    @on('post_start')
    async def announce(self):
        await self.bus.user_created.send('user_agent', user_id=1)

    @periodic(period=2, timeout=1, start_after=0.5)
    async def post_comment(self):
        self.comments_posted += 1
        text = f'comment #{self.comments_posted}'
        self.log.info('Posting %s', text)
        await self.bus.user_comment.send('user_agent', user_id=1, text=text)

    @cron('* * * * *', timeout=5)
    async def send_report(self):
        self.log.info('Cron: sending the report')
        await self.broker.mailer.send({'text': 'Report', 'email': 'admin@example.com'})

    @receiver(signals.user_created)
    async def welcome(self, signal, sender, user_id, **kwargs):
        self.log.info('Caught %s from %s: user %s', signal.name, sender, user_id)
        await self.broker.mailer.send({'text': 'Welcome', 'email': f'user{user_id}@example.com'})

    @receiver(signals.comment_created)
    async def count_comments(self, user_id, **kwargs):
        answer = await self.bus.rpc_comments_count.call('user_agent', timeout=5, user_id=user_id)
        self.log.info('RPC rpc_comments_count answered %s', answer)
