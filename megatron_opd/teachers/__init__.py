"""Teachers: SGLang protocol, async client, embedded server, TeacherPool, TeacherStore."""
