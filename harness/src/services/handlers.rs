//! What the four demo services answer when no fault is set.

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb;

/// `UserService`: every user exists and is called "User <id>".
#[derive(Debug, Clone, Copy)]
pub(super) struct Users;

#[tonic::async_trait]
impl pb::user_service_server::UserService for Users {
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let user_id = request.into_inner().user_id;
        Ok(Response::new(pb::User {
            display_name: format!("User {user_id}"),
            user_id,
        }))
    }
}

/// Post id that `ContentService` answers with `NOT_FOUND`: a client-side status, which the breaker must
/// count as a success.
pub const MISSING_POST_ID: &str = "missing";

/// `ContentService`: every post exists but [`MISSING_POST_ID`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Content;

fn post(post_id: String, author_id: String) -> pb::Post {
    pb::Post {
        text: format!("post {post_id} by {author_id}"),
        post_id,
        author_id,
    }
}

#[tonic::async_trait]
impl pb::content_service_server::ContentService for Content {
    type WatchPostsStream = Pin<Box<dyn Stream<Item = Result<pb::Post, Status>> + Send>>;

    async fn watch_posts(
        &self,
        request: Request<pb::WatchPostsRequest>,
    ) -> Result<Response<Self::WatchPostsStream>, Status> {
        let request = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // Bounded: at most 1,000 posts, at most 10 s apart; a client that goes away ends it.
        let interval = Duration::from_millis(u64::from(request.interval_ms.min(10_000)));
        tokio::spawn(async move {
            for i in 0..request.count.min(1_000) {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                let item = post(
                    format!("{}-{i}", request.author_id),
                    request.author_id.clone(),
                );
                if tx.send(Ok(item)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_post(
        &self,
        request: Request<pb::GetPostRequest>,
    ) -> Result<Response<pb::Post>, Status> {
        let post_id = request.into_inner().post_id;
        if post_id == MISSING_POST_ID {
            return Err(Status::not_found(format!("no post {post_id}")));
        }
        Ok(Response::new(post(post_id, "author".to_string())))
    }

    async fn list_posts(
        &self,
        request: Request<pb::ListPostsRequest>,
    ) -> Result<Response<pb::ListPostsResponse>, Status> {
        let request = request.into_inner();
        let posts = (0..request.limit.min(50)).map(|i| {
            post(
                format!("{}-{i}", request.author_id),
                request.author_id.clone(),
            )
        });
        Ok(Response::new(pb::ListPostsResponse {
            posts: posts.collect(),
        }))
    }
}

/// `FeedService`: a feed of `limit` (at most 50) made-up post ids.
#[derive(Debug, Clone, Copy)]
pub(super) struct Feeds;

#[tonic::async_trait]
impl pb::feed_service_server::FeedService for Feeds {
    async fn get_feed(
        &self,
        request: Request<pb::GetFeedRequest>,
    ) -> Result<Response<pb::Feed>, Status> {
        let request = request.into_inner();
        let post_ids = (0..request.limit.min(50))
            .map(|i| format!("{}-{i}", request.user_id))
            .collect();
        Ok(Response::new(pb::Feed {
            user_id: request.user_id,
            post_ids,
        }))
    }
}

/// `AuthService`: a token `valid-<user>` is allowed for `<user>`; anything else is not.
#[derive(Debug, Clone, Copy)]
pub(super) struct Auth;

#[tonic::async_trait]
impl pb::auth_service_server::AuthService for Auth {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let token = request.into_inner().token;
        let response = match token.strip_prefix("valid-") {
            Some(user) => pb::CheckResponse {
                allowed: true,
                user_id: user.to_string(),
            },
            None => pb::CheckResponse {
                allowed: false,
                user_id: String::new(),
            },
        };
        Ok(Response::new(response))
    }
}
