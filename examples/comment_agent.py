"""The comment agent: stores comments, answers how many a user wrote."""
import os
from collections import Counter

from microagent import MicroAgent, load_stuff, on, receiver

signals, queues = load_stuff(os.path.join(os.path.dirname(__file__), 'signals.json'))


class CommentAgent(MicroAgent):
    @on('pre_start')
    def setup(self):
        self.comments = Counter()

    @receiver(signals.user_comment)
    async def store_comment(self, user_id, text, **kwargs):
        self.comments[user_id] += 1
        comment_id = sum(self.comments.values())
        self.log.info('Stored comment %s of user %s: %s', comment_id, user_id, text)
        await self.bus.comment_created.send('comment_agent', comment_id=comment_id,
                                            user_id=user_id)
        await self.broker.mailer.send({'text': text, 'email': f'user{user_id}@example.com'})

    @receiver(signals.rpc_comments_count)
    def comments_count(self, user_id, **kwargs):
        return self.comments[user_id]
